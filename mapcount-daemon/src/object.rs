//! The eBPF object in the kernel: loaded with this kernel's layout, the
//! wake-up setting and the daemon's own identity, and the maps the daemon
//! reads from it (the per-CPU counters and totals, the event ring buffer)
//! or writes (the sample of small folios).
//! Attaching its programs is `probes`; draining the ring buffer, `ingest`.

use std::{io, sync::Mutex};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
};
use mapcount_common::{KernelLayout, totals::Totals};
use tokio::io::unix::AsyncFd;

use crate::config::Wakeup;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error(
        "loading the eBPF object failed: {}{hint}",
        error_chain(.0),
        hint = if os_error(.0) == Some(libc::EPERM) {
            "; mapcountd needs root, or CAP_BPF and CAP_PERFMON (plus CAP_SYS_ADMIN before 5.8)"
        } else {
            ""
        }
    )]
    Load(aya::EbpfError),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {error}")]
    Map { name: &'static str, error: aya::maps::MapError },
    #[error("polling a ring buffer: {0}")]
    Poll(#[from] io::Error),
}

/// An error and its sources, on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// The OS error code somewhere in an error's sources: hints are chosen
/// by it, not by the wording of a message.
pub fn os_error(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(code) = e.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) {
            return Some(code);
        }
        current = e.source();
    }
    None
}

/// How full the ring buffer gets before the kernel wakes the daemon: what
/// a drain finds when the daemon keeps up. 0: the kernel's own rule, a
/// wake-up whenever the daemon has caught up.
pub fn wakeup_bytes(ring_buffer_bytes: u32, wakeup: Wakeup) -> u64 {
    match wakeup {
        Wakeup::Batch => u64::from(ring_buffer_bytes / 16),
        Wakeup::EveryRecord => 0,
    }
}

/// Loads the embedded object with this kernel's layout. Nothing is attached yet.
/// `whole_fault_windows`: see `probes::whole_fault_windows`;
/// `vmemmap_base_address`: see `probes::KernelSymbols`.
pub fn load(
    layout: &KernelLayout,
    ring_buffer_bytes: u32,
    wakeup: Wakeup,
    whole_fault_windows: bool,
    vmemmap_base_address: u64,
) -> Result<Ebpf, ObjectError> {
    let wakeup_bytes = wakeup_bytes(ring_buffer_bytes, wakeup);
    // The daemon's own address space is left out in the kernel.
    let observer_tgid: u32 = std::process::id();
    EbpfLoader::new()
        .override_global("LAYOUT", layout, true)
        .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
        .override_global("OBSERVER_TGID", &observer_tgid, true)
        .override_global("WHOLE_FAULT_WINDOWS", &u32::from(whole_fault_windows), true)
        .override_global("VMEMMAP_BASE_ADDRESS", &vmemmap_base_address, true)
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .load(crate::EBPF_OBJECT)
        .map_err(ObjectError::Load)
}

/// The kernel's per-CPU counters of records produced and lost.
pub struct KernelCounters {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

/// A per-CPU array of the object, taken out of it for the daemon to read.
fn take_per_cpu_array<T: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<Mutex<PerCpuArray<MapData, T>>, ObjectError> {
    let map = ebpf.take_map(name).ok_or(ObjectError::MissingMap(name))?;
    let map = PerCpuArray::try_from(map).map_err(|error| ObjectError::Map { name, error })?;
    Ok(Mutex::new(map))
}

impl KernelCounters {
    pub fn from_object(ebpf: &mut Ebpf) -> Result<Self, ObjectError> {
        Ok(Self { map: take_per_cpu_array(ebpf, "COUNTERS")? })
    }

    /// One value per possible CPU for a `counter` slot.
    pub fn per_cpu(&self, slot: u32) -> Vec<u64> {
        let map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(&slot, 0).map(|per_cpu| per_cpu.to_vec()).unwrap_or_default()
    }

    pub fn sum(&self, slot: u32) -> u64 {
        self.per_cpu(slot).iter().sum()
    }
}

/// The kernel side's exact totals of rmap calls, pages and write faults
/// (`mapcount_common::totals`), per CPU.
pub struct KernelTotals {
    map: Mutex<PerCpuArray<MapData, Totals>>,
}

impl KernelTotals {
    pub fn from_object(ebpf: &mut Ebpf) -> Result<Self, ObjectError> {
        Ok(Self { map: take_per_cpu_array(ebpf, "TOTALS")? })
    }

    /// Every slot summed over the CPUs: one map lookup.
    pub fn sum(&self) -> Vec<u64> {
        let map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut sum = vec![0u64; mapcount_common::totals::COUNT];
        if let Ok(per_cpu) = map.get(&0, 0) {
            for cpu in per_cpu.iter() {
                sum.iter_mut().zip(cpu.slots).for_each(|(total, value)| *total += value);
            }
        }
        sum
    }
}

/// Which small folios the kernel side sends (`SAMPLING`): it follows the
/// daemon's table, which samples once it is over its memory budget.
pub struct KernelSampling {
    map: Array<MapData, u32>,
    shift: u32,
}

impl KernelSampling {
    pub fn from_object(ebpf: &mut Ebpf) -> Result<Self, ObjectError> {
        let map = ebpf.take_map("SAMPLING").ok_or(ObjectError::MissingMap("SAMPLING"))?;
        let map = Array::try_from(map).map_err(|error| ObjectError::Map { name: "SAMPLING", error })?;
        Ok(Self { map, shift: 0 })
    }

    /// Sends one small folio in 2^`shift` from now on.
    pub fn follow(&mut self, shift: u32) -> Result<(), ObjectError> {
        if shift != self.shift {
            self.map.set(0, shift, 0).map_err(|error| ObjectError::Map { name: "SAMPLING", error })?;
            self.shift = shift;
        }
        Ok(())
    }
}

pub fn event_ring(ebpf: &mut Ebpf) -> Result<AsyncFd<RingBuf<MapData>>, ObjectError> {
    let map = ebpf.take_map("EVENTS").ok_or(ObjectError::MissingMap("EVENTS"))?;
    let ring = RingBuf::try_from(map).map_err(|error| ObjectError::Map { name: "EVENTS", error })?;
    register(ring)
}

pub fn register<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>, ObjectError> {
    // SAFETY: `inner` owns its file descriptor, and the AsyncFd owns `inner`,
    // so the descriptor stays open for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| ObjectError::Poll(e.into_parts().1))
}
