//! Every way a VM ends, driven by tiny hand-assembled PVH guests (32-bit
//! protected mode, flat segments, no IDT): ACPI S5 power-off, the ACPI
//! reset register, the i8042 reset command, a triple fault, and a host stop
//! of a guest halted with interrupts off. Also COM1 output.

mod support;

use std::time::Duration;

use cocoon_vmm::{ExitReason, Vm, VmConfig};
use support::{kvm_or_skip, run_vm};

const LOAD_ADDR: u64 = 0x10_0000;

/// An ELF64 executable with one PT_LOAD of `code` at 1 MiB and a PT_NOTE
/// carrying the Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const NOTE_OFF: usize = 0x200;
    const CODE_OFF: usize = 0x1000;
    let mut f = vec![0u8; CODE_OFF];
    let put =
        |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    // ELF header.
    put(&mut f, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &0x3eu16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD_ADDR.to_le_bytes()); // e_entry
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
                                          // PT_LOAD.
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes());
    put(&mut f, ph + 4, &5u32.to_le_bytes()); // R+X
    put(&mut f, ph + 8, &(CODE_OFF as u64).to_le_bytes());
    put(&mut f, ph + 16, &LOAD_ADDR.to_le_bytes());
    put(&mut f, ph + 24, &LOAD_ADDR.to_le_bytes());
    put(&mut f, ph + 32, &(code.len() as u64).to_le_bytes());
    put(&mut f, ph + 40, &(code.len() as u64).to_le_bytes());
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE.
    let ph = 64 + 56;
    let note_len = 12 + 4 + 4;
    put(&mut f, ph, &4u32.to_le_bytes());
    put(&mut f, ph + 4, &4u32.to_le_bytes());
    put(&mut f, ph + 8, &(NOTE_OFF as u64).to_le_bytes());
    put(&mut f, ph + 32, &(note_len as u64).to_le_bytes());
    put(&mut f, ph + 40, &(note_len as u64).to_le_bytes());
    put(&mut f, ph + 48, &4u64.to_le_bytes());
    // The note: namesz, descsz, type 18, "Xen\0", the 32-bit entry.
    put(&mut f, NOTE_OFF, &4u32.to_le_bytes());
    put(&mut f, NOTE_OFF + 4, &4u32.to_le_bytes());
    put(&mut f, NOTE_OFF + 8, &18u32.to_le_bytes());
    put(&mut f, NOTE_OFF + 12, b"Xen\0");
    put(
        &mut f,
        NOTE_OFF + 16,
        &u32::try_from(LOAD_ADDR).unwrap().to_le_bytes(),
    );
    f.extend_from_slice(code);
    f
}

// mov dx, imm16 / mov al, imm8 / out dx, al / out imm8, al / jmp $
fn mov_dx(port: u16) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1]]
}
fn mov_al(v: u8) -> Vec<u8> {
    vec![0xb0, v]
}
const OUT_DX_AL: u8 = 0xee;
const SPIN: [u8; 2] = [0xeb, 0xfe];

fn acpi_power_off() -> Vec<u8> {
    // SLP_TYP 5 << 2 | SLP_EN to the FADT's sleep control port.
    [
        mov_dx(0x600),
        mov_al((5 << 2) | (1 << 5)),
        vec![OUT_DX_AL],
        SPIN.to_vec(),
    ]
    .concat()
}

fn run(code: Vec<u8>, cpus: u8) -> (ExitReason, String) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let mut config = VmConfig::new(&kernel);
    config.cpus = cpus;
    config.memory = 32 << 20;
    run_vm(config, Duration::from_secs(20))
}

#[test]
fn acpi_sleep_control_powers_off() {
    if !kvm_or_skip("ACPI power-off") {
        return;
    }
    assert_eq!(run(acpi_power_off(), 2).0, ExitReason::PowerOff);
}

#[test]
fn com1_output_reaches_the_log() {
    if !kvm_or_skip("COM1 output") {
        return;
    }
    let mut code = mov_dx(0x3f8);
    for b in b"hi from the guest\n" {
        code.extend(mov_al(*b));
        code.push(OUT_DX_AL);
    }
    code.extend(acpi_power_off());
    let (reason, out) = run(code, 1);
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(out, "hi from the guest\n");
}

#[test]
fn acpi_reset_register_resets() {
    if !kvm_or_skip("ACPI reset") {
        return;
    }
    let code = [mov_dx(0x602), mov_al(1), vec![OUT_DX_AL], SPIN.to_vec()].concat();
    assert_eq!(run(code, 1).0, ExitReason::Reset);
}

#[test]
fn i8042_reset_command_resets() {
    if !kvm_or_skip("i8042 reset") {
        return;
    }
    // out 0x64, 0xfe
    let code = [mov_al(0xfe), vec![0xe6, 0x64], SPIN.to_vec()].concat();
    assert_eq!(run(code, 1).0, ExitReason::Reset);
}

#[test]
fn triple_fault_resets() {
    if !kvm_or_skip("triple fault") {
        return;
    }
    // ud2 with an empty IDT: #UD cannot be delivered, #DF neither: shutdown.
    let code = [vec![0x0f, 0x0b], SPIN.to_vec()].concat();
    assert_eq!(run(code, 1).0, ExitReason::Reset);
}

#[test]
fn unknown_ports_read_as_all_ones_and_writes_are_ignored() {
    if !kvm_or_skip("unknown ports") {
        return;
    }
    // in al, 0x99; cmp al, 0xff; jne fail; out 0x99, al; <power off>
    // fail: jmp $ (the test then times out into a host stop).
    let power_off = acpi_power_off();
    let mut code = vec![0xe4, 0x99, 0x3c, 0xff, 0x75, 0x00, 0xe6, 0x99];
    code[5] = u8::try_from(2 + power_off.len()).unwrap(); // from after jne, past out and power-off
    code.extend(power_off);
    code.extend(SPIN);
    let (reason, _) = run(code, 1);
    assert_eq!(reason, ExitReason::PowerOff, "port 0x99 did not read 0xff");
}

#[test]
fn host_stop_ends_a_halted_guest_and_pause_resume_work_on_it() {
    if !kvm_or_skip("host stop of a halted guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("guest.elf");
    // cli; hlt; jmp back to hlt: halted in the kernel's irqchip for good.
    std::fs::write(&kernel, pvh_elf(&[0xfa, 0xf4, 0xeb, 0xfd])).unwrap();
    let mut config = VmConfig::new(&kernel);
    config.cpus = 4;
    config.memory = 32 << 20;
    let mut vm = Vm::start(config).unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(300)), None);
    vm.pause();
    assert!(vm.is_paused());
    vm.resume();
    assert!(!vm.is_paused());
    assert_eq!(vm.wait_timeout(Duration::from_millis(100)), None);
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}
