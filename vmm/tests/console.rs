//! The console and the graceful shutdown with the test guest: COM1's output
//! reaches a handler, input queued by the host is echoed back by the guest,
//! a pause holds both and a resume lets them go on, and Ctrl-Alt-Del from
//! the i8042 makes the guest power off, also after a snapshot taken with
//! the keys unread.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cocoon_vmm::snapshot::{RestoreConfig, MEMORY_FILE, STATE_FILE};
use cocoon_vmm::{ExitReason, OutputHandler, SerialOutput, Vm, VmConfig};
use support::{counts, kvm_or_skip, report, test_guest};

/// Everything the guest wrote to COM1, through [`SerialOutput::Handler`].
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn output(&self) -> SerialOutput {
        let buf = self.0.clone();
        SerialOutput::Handler(OutputHandler::new(move |bytes| {
            buf.lock().unwrap().extend_from_slice(bytes)
        }))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits (60 s at most) until `pred` holds of the output; returns it.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.text();
            if pred(&s) {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {s}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_for_line(&self, line: &str) -> String {
        self.wait_for(line, |s| report(s).iter().any(|l| l == line))
    }
}

fn boot(cmdline: &str, out: &Captured) -> Vm {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.into();
    config.serial = out.output();
    Vm::start(config).expect("start the VM")
}

/// Queues all of `bytes`, a FIFO's worth at a time.
fn type_in(vm: &Vm, bytes: &[u8]) {
    let t0 = Instant::now();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = vm.console_input(rest);
        rest = &rest[n..];
        if n == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the guest stopped reading"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn the_handler_gets_the_count_lines_and_input_is_echoed() {
    if !kvm_or_skip("console: handler and echo") {
        return;
    }
    let out = Captured::default();
    let mut vm = boot("cocoon.count=20:0", &out);
    let s = out.wait_for("three count lines", |s| counts(s).len() >= 3);
    assert!(s.starts_with("cocoon-guest: start\n"), "{s}");
    let n = counts(&s);
    assert_eq!(n[..3], [1, 2, 3], "{s}");

    type_in(&vm, b"hello world\n");
    out.wait_for_line("input: hello world");
    // A terminal's Enter is \r; bytes outside printable ASCII are escaped;
    // a line longer than the UART's 64-byte FIFO arrives whole.
    let long = "x".repeat(100);
    type_in(&vm, format!("tab\there\r{long}\r\n").as_bytes());
    out.wait_for_line("input: tab\\x09here");
    let s = out.wait_for_line(&format!("input: {long}"));
    let all = counts(&s);
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "counter skipped or repeated: {all:?}"
    );
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}

#[test]
fn a_pause_holds_the_count_and_the_echo_and_a_resume_lets_them_go_on() {
    if !kvm_or_skip("console: pause and resume") {
        return;
    }
    let out = Captured::default();
    let mut vm = boot("cocoon.count=20:0", &out);
    out.wait_for("a count line", |s| !counts(s).is_empty());
    vm.pause();
    let frozen = out.text();
    // Input while paused waits in the FIFO.
    assert_eq!(vm.console_input(b"while paused\n"), 13);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(out.text(), frozen, "output while paused");
    let last = *counts(&frozen).last().unwrap();
    vm.resume();
    let s = out.wait_for("counting after the resume", |s| {
        counts(s).last().is_some_and(|&n| n >= last + 3)
    });
    out.wait_for_line("input: while paused");
    let all = counts(&s);
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "counter skipped or repeated across the pause: {all:?}"
    );
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}

#[test]
fn ctrl_alt_del_powers_the_guest_off() {
    if !kvm_or_skip("console: ctrl-alt-del") {
        return;
    }
    let out = Captured::default();
    // TICKS 0: only the request ends it.
    let mut vm = boot("cocoon.count=20:0", &out);
    out.wait_for("a count line", |s| !counts(s).is_empty());
    let t0 = Instant::now();
    vm.send_ctrl_alt_del().unwrap();
    let reason = vm.wait_timeout(Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(reason, Some(ExitReason::PowerOff), "{}", out.text());
    assert_eq!(vm.wait(), ExitReason::PowerOff);
    eprintln!("ctrl-alt-del to power-off: {took:?}");
    let lines = report(&out.text());
    assert_eq!(
        lines.last().map(String::as_str),
        Some("ctrl-alt-del: powering off"),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("done")), "{lines:?}");
}

#[test]
fn unread_keys_refuse_a_second_request_and_go_through_a_snapshot() {
    if !kvm_or_skip("console: ctrl-alt-del through a snapshot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Captured::default();
    let mut vm = boot("cocoon.count=20:0", &out);
    out.wait_for("a count line", |s| !counts(s).is_empty());
    vm.pause();
    // The paused guest cannot read the keys: they wait in the i8042, and
    // a second request does not fit beside them.
    vm.send_ctrl_alt_del().unwrap();
    let e = vm.send_ctrl_alt_del().unwrap_err();
    let text = error_chain(&e);
    assert!(text.contains("has not read 11 bytes"), "{text}");
    vm.snapshot(dir.path()).expect("snapshot");
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);

    let restored_out = Captured::default();
    let mut restored = Vm::restore(RestoreConfig {
        state: dir.path().join(STATE_FILE),
        memory: dir.path().join(MEMORY_FILE),
        disks: Vec::new(),
        nets: Vec::new(),
        serial: restored_out.output(),
    })
    .expect("restore");
    let reason = restored.wait_timeout(Duration::from_secs(10));
    assert_eq!(
        reason,
        Some(ExitReason::PowerOff),
        "{}",
        restored_out.text()
    );
    assert_eq!(restored.wait(), ExitReason::PowerOff);
    assert!(
        report(&restored_out.text())
            .iter()
            .any(|l| l == "ctrl-alt-del: powering off"),
        "{}",
        restored_out.text()
    );
}

/// An error and its sources, as the CLI prints them.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
