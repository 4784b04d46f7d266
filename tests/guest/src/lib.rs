//! The machine-independent part of the test guest: command-line parsing,
//! the Ethernet frames it sends and reads, and its console input.
//! A library so its tests run on the host
//! (`cargo test --lib --target x86_64-unknown-linux-gnu`).

#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod console;
pub mod frames;
pub mod netcmd;
