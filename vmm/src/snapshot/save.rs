//! [`Vm::snapshot`]: the state and memory of a paused VM, written whole or
//! not at all.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::cpu::{self, CpuStateError, HostCpu};
use super::kvm_vm::{self, KvmVmError};
use super::memory_file::{self, Backing, MemoryFileError};
use super::state::{memory_layout, MachineState, VirtioDeviceState};
use super::{format, SnapshotInfo, MEMORY_FILE, STATE_FILE};
use crate::devices::lock;
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM is not paused: pause it before taking a snapshot")]
    NotPaused,
    #[error("the VM has stopped ({0})")]
    Stopped(crate::ExitReason),
    #[error("cannot read the host's vCPU capabilities")]
    HostCpu(#[source] CpuStateError),
    #[error("cannot save vcpu{index}")]
    Cpu {
        index: usize,
        #[source]
        source: CpuStateError,
    },
    #[error("cannot save the VM's KVM state")]
    KvmVm(#[source] KvmVmError),
    #[error("virtio device {index} (type {device_type}) cannot be snapshotted")]
    DeviceUnsupported { index: usize, device_type: u32 },
    #[error("the VM has no serial device")]
    NoSerial,
    #[error("cannot encode the state")]
    Encode(#[source] postcard::Error),
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// A file being written under a temporary name; removed unless committed.
struct Partial {
    tmp: PathBuf,
    file: File,
    committed: bool,
}

impl Partial {
    fn create(dir: &Path, name: &str) -> Result<Partial, SnapshotError> {
        let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok(Partial {
            tmp,
            file,
            committed: false,
        })
    }

    /// fsync, then rename over `dir/name`.
    fn commit(mut self, dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
        self.file.sync_all().map_err(io_err("fsync", &self.tmp))?;
        let dest = dir.join(name);
        std::fs::rename(&self.tmp, &dest).map_err(io_err("rename into place", &dest))?;
        self.committed = true;
        Ok(dest)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Vm {
    /// Writes a snapshot of this paused VM into `dir` (which must exist):
    /// [`STATE_FILE`] and [`MEMORY_FILE`]. See [`crate::snapshot`].
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        if let Some(reason) = self.exit_reason() {
            return Err(SnapshotError::Stopped(reason));
        }
        if !self.is_paused() || !self.machine.workers.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        let state = self.capture()?;

        let memory = Partial::create(dir, MEMORY_FILE)?;
        memory
            .file
            .set_len(state.memory_bytes)
            .map_err(io_err("size", &memory.tmp))?;
        // A restored VM's memory is its snapshot's file, mapped over a
        // reservation; a booted VM's is anonymous.
        let backing = if self.machine.reservation.is_some() {
            Backing::File
        } else {
            Backing::Anonymous
        };
        let memory_data_bytes = memory_file::write(
            &self.machine.mem,
            &state.memory,
            backing,
            &memory.file,
            &memory.tmp.display().to_string(),
        )?;
        let memory_path = memory.commit(dir, MEMORY_FILE)?;

        let bytes = format::encode(&state).map_err(SnapshotError::Encode)?;
        let mut file = Partial::create(dir, STATE_FILE)?;
        file.file
            .write_all(&bytes)
            .map_err(io_err("write", &file.tmp))?;
        let state_path = file.commit(dir, STATE_FILE)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", dir))?;

        Ok(SnapshotInfo {
            state: state_path,
            memory: memory_path,
            version: format::CURRENT,
            cpus: state.cpus,
            memory_bytes: state.memory_bytes,
            memory_data_bytes,
            state_bytes: bytes.len() as u64,
            tsc_khz: state.tsc_khz,
            disks: state.disk_summaries(),
            nics: state.nic_summaries(),
        })
    }

    /// The machine state, from the parked vCPUs and devices.
    fn capture(&self) -> Result<MachineState, SnapshotError> {
        let m = &self.machine;
        let host = HostCpu::probe(&m.kvm, &m.vm).map_err(SnapshotError::HostCpu)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.iter().enumerate() {
            let state = cpu::save(&lock(fd), &host)
                .map_err(|source| SnapshotError::Cpu { index, source })?;
            vcpus.push(state);
        }
        let tsc_khz = self
            .vcpus
            .first()
            .and_then(|fd| lock(fd).get_tsc_khz().ok());
        let vm = kvm_vm::save(&m.vm).map_err(SnapshotError::KvmVm)?;
        let serial = lock(m.serial.as_ref().ok_or(SnapshotError::NoSerial)?).state();
        let i8042 = m
            .i8042
            .as_ref()
            .map(|d| lock(d).state())
            .unwrap_or_default();
        let mut devices = Vec::with_capacity(m.virtio.len());
        for (index, slot) in m.virtio.iter().enumerate() {
            let t = lock(&slot.transport);
            let transport = t.state();
            let device = t.device_state().ok_or(SnapshotError::DeviceUnsupported {
                index,
                device_type: transport.device_type,
            })?;
            devices.push(VirtioDeviceState { transport, device });
        }
        let memory_bytes = self.memory_bytes();
        Ok(MachineState {
            cpus: u8::try_from(self.vcpus.len()).expect("create_vcpus makes at most 255"),
            memory_bytes,
            tsc_khz,
            memory: memory_layout(memory_bytes),
            vcpus,
            vm,
            serial,
            devices,
            i8042,
        })
    }
}
