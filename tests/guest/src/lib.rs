//! The machine-independent part of the test guest: command-line parsing
//! and the Ethernet frames it sends and reads.
//! A library so its tests run on the host
//! (`cargo test --lib --target x86_64-unknown-linux-gnu`).

#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod frames;
pub mod netcmd;
