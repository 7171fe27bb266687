//! Which kernel functions the programs attach to, and attaching them.
//!
//! Each logical probe has an ordered list of candidate functions; the first
//! one the running kernel has out of line (listed in `/proc/kallsyms`,
//! possibly with a compiler suffix such as `.isra.0`) is used. A missing
//! optional probe only empties the metrics that need it.

use std::{collections::HashSet, fs, hash::BuildHasher as _, io};

use aya::{
    Btf, Ebpf,
    programs::{FEntry, FExit, KProbe, Program, ProgramError, RawTracePoint},
};
use hashbrown::HashTable;
use mapcount_common::{KernelLayout, OFFSET_ABSENT, khugepaged_arg};
use rustc_hash::FxBuildHasher;

pub use crate::layout::Need;
use crate::{
    config::AttachMode,
    object::{error_chain, os_error},
};

pub struct ProbeSpec {
    /// Logical name: the `probe` label of `mapcount_probe_attached`.
    pub name: &'static str,
    /// In order of preference: the first one that exists and attaches is used.
    pub candidates: &'static [Candidate],
    pub need: Need,
    /// Which metrics stay empty without it (for `mapcountd check`).
    pub feeds: &'static str,
    pub when: When,
}

/// On which kernels a probe is wanted at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only where write faults are classified over `handle_mm_fault`
    /// ([`whole_fault_windows`]); elsewhere it would only cost time.
    WholeFaultWindows,
}

/// A kernel function and the programs that understand its arguments.
pub struct Candidate {
    pub function: &'static str,
    /// kprobe (or kretprobe) program.
    pub kprobe: &'static str,
    /// fentry (or fexit) program.
    pub fentry: &'static str,
    pub at: At,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Entry,
    Return,
}

macro_rules! entry {
    ($function:literal, $kprobe:literal, $fentry:literal) => {
        Candidate { function: $function, kprobe: $kprobe, fentry: $fentry, at: At::Entry }
    };
}
macro_rules! ret {
    ($function:literal, $kprobe:literal, $fentry:literal) => {
        Candidate { function: $function, kprobe: $kprobe, fentry: $fentry, at: At::Return }
    };
}

const RMAP: &str = "mapcount_rmap_calls_total, mapcount_rmap_pages_total";
const COW: &str = "mapcount_cow_faults_total, mapcount_cow_fault_duration_seconds";

/// Every logical probe, with the functions that implement it in each kernel
/// generation: the folio_* rmap functions of 6.8+ first, then the page_*
/// functions of 6.1-6.7.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "anon_add_ptes",
        candidates: &[
            entry!("folio_add_anon_rmap_ptes", "add_anon_ptes", "add_anon_ptes_fentry"),
            entry!("page_add_anon_rmap", "page_add_anon", "page_add_anon_fentry"),
        ],
        need: Need::Core,
        when: When::Always,
        feeds: RMAP,
    },
    ProbeSpec {
        // 6.1-6.7 map anonymous PMDs through page_add_anon_rmap too (anon_add_ptes).
        name: "anon_add_pmd",
        candidates: &[entry!("folio_add_anon_rmap_pmd", "add_anon_pmd", "add_anon_pmd_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "PMD rows of the rmap metrics (6.8+)",
    },
    ProbeSpec {
        name: "anon_add_new",
        candidates: &[
            entry!("folio_add_new_anon_rmap", "add_new_anon", "add_new_anon_fentry"),
            entry!("page_add_new_anon_rmap", "page_add_new_anon", "page_add_new_anon_fentry"),
        ],
        need: Need::Core,
        when: When::Always,
        feeds: "op=\"add_new\" rmap rows, COW copy detection",
    },
    ProbeSpec {
        name: "file_add_ptes",
        candidates: &[
            entry!("folio_add_file_rmap_ptes", "add_file_ptes", "add_file_ptes_fentry"),
            entry!("page_add_file_rmap", "page_add_file", "page_add_file_fentry"),
        ],
        need: Need::Core,
        when: When::Always,
        feeds: RMAP,
    },
    ProbeSpec {
        name: "file_add_pmd",
        candidates: &[entry!("folio_add_file_rmap_pmd", "add_file_pmd", "add_file_pmd_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "PMD rows of the rmap metrics (6.8+)",
    },
    ProbeSpec {
        name: "file_add_pud",
        candidates: &[entry!("folio_add_file_rmap_pud", "add_file_pud", "add_file_pud_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "PUD rows of the rmap metrics (6.15+)",
    },
    ProbeSpec {
        name: "remove_ptes",
        candidates: &[
            entry!("folio_remove_rmap_ptes", "remove_ptes", "remove_ptes_fentry"),
            entry!("page_remove_rmap", "page_remove", "page_remove_fentry"),
        ],
        need: Need::Core,
        when: When::Always,
        feeds: RMAP,
    },
    ProbeSpec {
        name: "remove_pmd",
        candidates: &[entry!("folio_remove_rmap_pmd", "remove_pmd", "remove_pmd_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "PMD rows of the rmap metrics (6.8+)",
    },
    ProbeSpec {
        name: "remove_pud",
        candidates: &[entry!("folio_remove_rmap_pud", "remove_pud", "remove_pud_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "PUD rows of the rmap metrics (6.15+)",
    },
    ProbeSpec {
        name: "write_fault",
        // Where do_wp_page is inlined into its caller (small kernel builds),
        // the window spans handle_mm_fault, which cannot disappear.
        candidates: &[
            entry!("do_wp_page", "write_fault_entry_kprobe", "write_fault_entry_fentry"),
            entry!("handle_mm_fault", "fault_window_entry_kprobe", "fault_window_entry_fentry"),
        ],
        need: Need::Core,
        when: When::Always,
        feeds: COW,
    },
    ProbeSpec {
        name: "write_fault_return",
        candidates: &[
            ret!("do_wp_page", "write_fault_return_kretprobe", "write_fault_return_fexit"),
            ret!("handle_mm_fault", "fault_window_return_kretprobe", "fault_window_return_fexit"),
        ],
        need: Need::Core,
        when: When::Always,
        feeds: COW,
    },
    // The reuse marker. wp_page_reuse is static and often not probe-able
    // (Debian 6.12 lists it in kallsyms but kprobes refuse it); inside the
    // write-fault window only the reuse path upgrades the PTE in place with
    // ptep_set_access_flags.
    ProbeSpec {
        name: "write_fault_reuse",
        candidates: &[
            entry!("wp_page_reuse", "reuse_marker", "reuse_marker_fentry"),
            entry!("ptep_set_access_flags", "reuse_pte_marker", "reuse_pte_marker_fentry"),
        ],
        need: Need::Optional,
        when: When::Always,
        feeds: "outcome=\"reuse\" of exclusive pages (else counted as \"other\")",
    },
    ProbeSpec {
        name: "fork",
        candidates: &[entry!("copy_page_range", "fork_copy_kprobe", "fork_copy_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "sharing across fork (mapcount_folios_shared, sharers), mapcount_forks_total",
    },
    ProbeSpec {
        name: "write_fault_move_anon",
        candidates: &[
            entry!("folio_move_anon_rmap", "move_anon_marker", "move_anon_marker_fentry"),
            entry!("page_move_anon_rmap", "move_anon_marker", "move_anon_marker_fentry"),
        ],
        need: Need::Optional,
        when: When::Always,
        feeds: "outcome=\"reuse\" of pages shared before fork",
    },
    // Entries moved by mremap, reported at return (kprobe mode keeps the
    // arguments from entry).
    // Write faults on PMD-mapped anonymous THPs: reused in place, or split
    // and handed to do_wp_page (not counted here then).
    ProbeSpec {
        name: "write_fault_clear_flush",
        // fentry cannot take ptep_clear_flush (it returns a pte_t struct);
        // on x86 it flushes through flush_tlb_mm_range, which fentry can.
        candidates: &[
            entry!("ptep_clear_flush", "clear_flush_marker", "clear_flush_marker_fentry"),
            entry!("flush_tlb_mm_range", "clear_flush_marker", "clear_flush_marker_fentry"),
        ],
        need: Need::Optional,
        when: When::WholeFaultWindows,
        feeds: "outcome=\"copy\" where do_wp_page is inlined (copies are then not told from first touches)",
    },
    ProbeSpec {
        name: "write_fault_pmd",
        candidates: &[entry!(
            "do_huge_pmd_wp_page",
            "pmd_write_fault_entry_kprobe",
            "pmd_write_fault_entry_fentry"
        )],
        need: Need::Optional,
        when: When::Always,
        feeds: "write faults on PMD-mapped THPs (order=\"9\" rows of mapcount_cow_faults_total)",
    },
    ProbeSpec {
        name: "write_fault_pmd_return",
        candidates: &[ret!(
            "do_huge_pmd_wp_page",
            "pmd_write_fault_return_kretprobe",
            "pmd_write_fault_return_fexit"
        )],
        need: Need::Optional,
        when: When::Always,
        feeds: "write faults on PMD-mapped THPs (order=\"9\" rows of mapcount_cow_faults_total)",
    },
    ProbeSpec {
        name: "move",
        candidates: &[entry!("move_page_tables", "move_entry", "move_entry_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "sharing across fork after mremap (mappings stay at the old address)",
    },
    ProbeSpec {
        name: "move_return",
        candidates: &[ret!("move_page_tables", "move_return", "move_fexit")],
        need: Need::Optional,
        when: When::Always,
        feeds: "sharing across fork after mremap (mappings stay at the old address)",
    },
    // Teardown: at exit_mmap's return, what is still filed under the mm is a
    // phantom. kprobe mode keeps the argument from entry to return.
    ProbeSpec {
        name: "teardown",
        candidates: &[entry!("exit_mmap", "teardown_entry", "teardown_entry_fentry")],
        need: Need::Optional,
        when: When::Always,
        feeds: "mapcount_phantom_mappings_total{found=\"teardown\"}",
    },
    ProbeSpec {
        name: "teardown_return",
        candidates: &[ret!("exit_mmap", "teardown_return", "teardown_fexit")],
        need: Need::Optional,
        when: When::Always,
        feeds: "mapcount_phantom_mappings_total{found=\"teardown\"}",
    },
];

/// A kernel tracepoint and the raw-tracepoint programs that read it.
/// Tracepoints are kept for tools: no inlining or compiler renaming takes
/// them away, and attaching one needs neither kprobes nor fentry.
pub struct TracepointSpec {
    /// Logical name: the `probe` label of `mapcount_probe_attached`.
    pub name: &'static str,
    pub tracepoint: &'static str,
    /// One program per shape the tracepoint's arguments have had.
    pub programs: &'static [&'static str],
    /// The program that reads this kernel's arguments, where its BTF says
    /// what they are.
    pub program_for: fn(&KernelLayout) -> Option<&'static str>,
    /// Which metrics stay empty without it.
    pub feeds: &'static str,
}

pub const TRACEPOINTS: &[TracepointSpec] = &[TracepointSpec {
    name: "khugepaged_shared_refusals",
    tracepoint: "mm_khugepaged_scan_pmd",
    programs: &["khugepaged_scan_pmd_page", "khugepaged_scan_pmd_pfn"],
    program_for: |layout| {
        if layout.scan_exceed_shared_pte == OFFSET_ABSENT {
            return None;
        }
        match (layout.khugepaged_status_arg, layout.khugepaged_stopped_at) {
            (5, khugepaged_arg::PAGE) => Some("khugepaged_scan_pmd_page"),
            (4, khugepaged_arg::PFN) => Some("khugepaged_scan_pmd_pfn"),
            _ => None,
        }
    },
    feeds: "mapcount_khugepaged_shared_pte_refusals_total",
}];

/// What happened to one tracepoint.
#[derive(Debug)]
pub enum TracepointStatus {
    Attached,
    /// BTF does not describe its arguments as a program expects them, or
    /// lacks the value the program tests.
    Unreadable,
    AttachFailed(ProgramError),
}

pub struct TracepointReport {
    pub spec: &'static TracepointSpec,
    pub status: TracepointStatus,
}

fn raw_tracepoint<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut RawTracePoint, ProbesError> {
    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(ProbesError::MissingProgram(name))
}

/// Loads every tracepoint program (the verifier runs) without attaching;
/// returns how many.
pub fn load_tracepoint_programs(ebpf: &mut Ebpf) -> Result<usize, ProbesError> {
    let mut loaded = 0;
    for &name in TRACEPOINTS.iter().flat_map(|spec| spec.programs) {
        let program = raw_tracepoint(ebpf, name)?;
        if program.fd().is_err() {
            program.load().map_err(|error| ProbesError::Load { program: name, error })?;
        }
        loaded += 1;
    }
    Ok(loaded)
}

/// Attaches every tracepoint whose arguments a program can read on this
/// kernel; never fails because one is missing.
pub fn attach_tracepoints(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
) -> Result<Vec<TracepointReport>, ProbesError> {
    let mut reports = Vec::with_capacity(TRACEPOINTS.len());
    for spec in TRACEPOINTS {
        let status = match (spec.program_for)(layout) {
            Some(name) => {
                let program = raw_tracepoint(ebpf, name)?;
                match program.load().and_then(|()| program.attach(spec.tracepoint).map(drop)) {
                    Ok(()) => TracepointStatus::Attached,
                    Err(error) => TracepointStatus::AttachFailed(error),
                }
            }
            None => TracepointStatus::Unreadable,
        };
        reports.push(TracepointReport { spec, status });
    }
    Ok(reports)
}

/// Whether write faults are classified over the whole `handle_mm_fault`
/// call: the kernel has no `do_wp_page` out of line.
pub fn whole_fault_windows(symbols: &KernelSymbols) -> bool {
    symbols.find("do_wp_page").is_none() && symbols.find("handle_mm_fault").is_some()
}

/// Function names the kernel has out of line, from `/proc/kallsyms`.
pub struct KernelSymbols {
    /// The file as read: 120,000 lines on a distribution kernel, whose
    /// names are not copied out one by one (that was most of start-up's
    /// wait for this file).
    text: String,
    /// Text symbols' names, as (start, end) in `text`, hashed by name.
    functions: HashTable<(u32, u32)>,
    /// Address of the variable `vmemmap_base` (x86-64), 0 if absent or
    /// hidden (kallsyms shows zeros without privileges). Never shown.
    pub vmemmap_base_address: u64,
}

impl KernelSymbols {
    pub fn read() -> io::Result<Self> {
        Ok(Self::parse(fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(text: String) -> Self {
        let mut vmemmap_base_address = 0;
        let mut names = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(address), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if name == "vmemmap_base" && matches!(kind, "d" | "D") {
                vmemmap_base_address = u64::from_str_radix(address, 16).unwrap_or(0);
            }
            // Text symbols only; module symbols carry a "[module]" fourth field and are fine too.
            if matches!(kind, "t" | "T") {
                let start = name.as_ptr() as usize - text.as_ptr() as usize;
                names.push((start as u32, (start + name.len()) as u32));
            }
        }
        let mut functions = HashTable::with_capacity(names.len());
        let name_of = |&(start, end): &(u32, u32)| &text[start as usize..end as usize];
        for range in names {
            functions.insert_unique(FxBuildHasher.hash_one(name_of(&range)), range, |r| {
                FxBuildHasher.hash_one(name_of(r))
            });
        }
        Self { text, functions, vmemmap_base_address }
    }

    fn name(&self, &(start, end): &(u32, u32)) -> &str {
        &self.text[start as usize..end as usize]
    }

    /// The symbol to attach to for `function`: the plain name, or the name
    /// with a compiler suffix (`.isra.0`, `.constprop.0`, ...).
    pub fn find(&self, function: &str) -> Option<String> {
        let hash = FxBuildHasher.hash_one(function);
        if self.functions.find(hash, |r| self.name(r) == function).is_some() {
            return Some(function.to_owned());
        }
        let prefix = format!("{function}.");
        let mut suffixed: Vec<&str> =
            self.functions.iter().map(|r| self.name(r)).filter(|n| n.starts_with(&prefix)).collect();
        suffixed.sort_unstable();
        suffixed.first().map(|s| (*s).to_owned())
    }

    /// Functions that function tracing (fentry) may attach to, when tracefs
    /// says; `None` when it cannot be read.
    pub fn traceable() -> Option<HashSet<String>> {
        [
            "/sys/kernel/tracing/available_filter_functions",
            "/sys/kernel/debug/tracing/available_filter_functions",
        ]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .map(|text| text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
    }
}

/// What happened to one logical probe.
#[derive(Debug)]
pub enum ProbeStatus {
    Attached {
        function: String,
        mode: AttachMode,
    },
    /// None of the candidate functions exists out of line in this kernel.
    NoFunction,
    /// The function exists but attaching failed (no kprobe support, lockdown, ...).
    AttachFailed {
        function: String,
        error: AttachError,
    },
    /// Not wanted on this kernel (see [`When`]).
    NotWanted,
}

/// Why a program did not attach to a function that exists.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no kernel BTF for fentry")]
    NoBtf,
    #[error("no such program in the object: {0}")]
    MissingProgram(&'static str),
    #[error(
        "{}{hint}",
        error_chain(.0),
        hint = paranoid_hint(.0)
    )]
    Kprobe(ProgramError),
    #[error("{}", error_chain(.0))]
    Fentry(ProgramError),
}

pub struct ProbeReport {
    pub spec: &'static ProbeSpec,
    pub status: ProbeStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbesError {
    #[error("the eBPF object has no program {0}; the daemon and the object are out of step")]
    MissingProgram(&'static str),
    #[error("program {program} failed to load: {}", error_chain(error))]
    Load { program: &'static str, error: ProgramError },
    #[error("a thread loading programs panicked")]
    LoadThread,
}

fn kprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut KProbe, ProbesError> {
    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(ProbesError::MissingProgram(name))
}

/// perf_event_open's EACCES without CAP_SYS_ADMIN usually means Debian's
/// `kernel.perf_event_paranoid=3`, which refuses it even with CAP_PERFMON.
fn paranoid_hint(error: &ProgramError) -> String {
    if os_error(error) != Some(libc::EACCES) {
        return String::new();
    }
    match std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid") {
        Ok(level) if level.trim().parse::<i32>().is_ok_and(|l| l > 2) => format!(
            "; kernel.perf_event_paranoid is {} (kprobes need CAP_SYS_ADMIN): set it to 2, or use attach.mode fentry",
            level.trim()
        ),
        _ => String::new(),
    }
}

/// Every kprobe program, each once.
fn kprobe_programs() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = PROBES.iter().flat_map(|s| s.candidates).map(|c| c.kprobe).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Loads every kprobe program (the verifier runs on each) without attaching;
/// returns how many. fentry programs are verified when they attach: their
/// load already names the target function.
pub fn load_kprobes(ebpf: &mut Ebpf) -> Result<usize, ProbesError> {
    let names = kprobe_programs();
    load_in_parallel(ebpf, &names)?;
    Ok(names.len())
}

/// A kprobe program, loaded if it was not yet. A verifier refusal is an
/// error of the object, not of this kernel's functions: it stops start-up.
fn loaded_kprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut KProbe, ProbesError> {
    let program = kprobe(ebpf, name)?;
    if program.fd().is_err() {
        program.load().map_err(|error| ProbesError::Load { program: name, error })?;
    }
    Ok(program)
}

/// Attaches every probe whose function exists; never fails because one is missing.
pub fn attach_all(
    ebpf: &mut Ebpf,
    symbols: &KernelSymbols,
    btf: Option<&Btf>,
    mode: AttachMode,
    whole_fault_windows: bool,
) -> Result<Vec<ProbeReport>, ProbesError> {
    // Each load runs the verifier, which takes most of start-up. kprobe
    // programs are loaded when first needed (in auto mode, where fentry
    // attaches, never), or all at once on every CPU once it is known that
    // they will be: in kprobe mode, or where this kernel refuses fentry.
    let wanted = |spec: &ProbeSpec| spec.when != When::WholeFaultWindows || whole_fault_windows;
    let mut fentry_refused = mode == AttachMode::Kprobe;
    let mut kprobes_loaded = false;
    let mut reports = Vec::with_capacity(PROBES.len());
    for (index, spec) in PROBES.iter().enumerate() {
        if !wanted(spec) {
            reports.push(ProbeReport { spec, status: ProbeStatus::NotWanted });
            continue;
        }
        let mut status = ProbeStatus::NoFunction;
        'candidates: for candidate in spec.candidates {
            let Some(function) = symbols.find(candidate.function) else { continue };
            let modes: &[AttachMode] = match mode {
                AttachMode::Auto => &[AttachMode::Fentry, AttachMode::Kprobe],
                AttachMode::Fentry => &[AttachMode::Fentry],
                AttachMode::Kprobe => &[AttachMode::Kprobe],
            };
            for &try_mode in modes {
                if try_mode == AttachMode::Fentry && fentry_refused {
                    continue;
                }
                if try_mode == AttachMode::Kprobe && fentry_refused && !kprobes_loaded {
                    // This probe and those after it.
                    let needed: Vec<&'static str> = PROBES[index..]
                        .iter()
                        .filter(|spec| wanted(spec))
                        .flat_map(|spec| spec.candidates)
                        .filter(|c| symbols.find(c.function).is_some())
                        .map(|c| c.kprobe)
                        .collect();
                    load_in_parallel(ebpf, &needed)?;
                    kprobes_loaded = true;
                }
                let result = match try_mode {
                    AttachMode::Fentry => {
                        let result = attach_fentry(ebpf, candidate, btf);
                        fentry_refused = result.as_ref().is_err_and(refused_everywhere);
                        result
                    }
                    _ => loaded_kprobe(ebpf, candidate.kprobe)?
                        .attach(&function, 0)
                        .map(drop)
                        .map_err(AttachError::Kprobe),
                };
                match result {
                    Ok(()) => {
                        status = ProbeStatus::Attached { function, mode: try_mode };
                        break 'candidates;
                    }
                    // Keep trying; report the first failure if nothing attaches.
                    Err(error) => {
                        if !matches!(status, ProbeStatus::AttachFailed { .. }) {
                            status = ProbeStatus::AttachFailed { function: function.clone(), error };
                        }
                    }
                }
            }
        }
        reports.push(ProbeReport { spec, status });
    }
    Ok(reports)
}

/// Whether an fentry failure says the kernel takes no fentry program at
/// all (no BTF, no trampolines: EPERM, EOPNOTSUPP, ENOTSUPP), rather than
/// not on this function.
fn refused_everywhere(error: &AttachError) -> bool {
    const ENOTSUPP: i32 = 524;
    match error {
        AttachError::NoBtf => true,
        AttachError::Fentry(error) => {
            matches!(os_error(error), Some(libc::EPERM | libc::EOPNOTSUPP | ENOTSUPP))
        }
        _ => false,
    }
}

/// Loads the named kprobe programs not loaded yet, spread over the CPUs:
/// the verifier runs in the loading thread.
fn load_in_parallel(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), ProbesError> {
    let mut programs: Vec<(&'static str, &mut KProbe)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| {
            let name = *names.iter().find(|n| **n == name)?;
            let program: &mut KProbe = program.try_into().ok()?;
            program.fd().is_err().then_some((name, program))
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let per_thread = programs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .chunks_mut(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    for (name, program) in chunk {
                        program.load().map_err(|error| ProbesError::Load { program: name, error })?;
                    }
                    Ok(())
                })
            })
            .collect();
        loads.into_iter().try_for_each(|load| load.join().unwrap_or(Err(ProbesError::LoadThread)))
    })
}

/// fentry/fexit need the function's BTF id (functions renamed by the
/// compiler, `.isra` and friends, have none) and function tracing.
fn attach_fentry(ebpf: &mut Ebpf, candidate: &Candidate, btf: Option<&Btf>) -> Result<(), AttachError> {
    let btf = btf.ok_or(AttachError::NoBtf)?;
    let program = ebpf.program_mut(candidate.fentry).ok_or(AttachError::MissingProgram(candidate.fentry))?;
    // A program whose load or attach failed cannot take another target
    // until it is unloaded.
    let result = match candidate.at {
        At::Entry => {
            let program: &mut FEntry = program.try_into().map_err(AttachError::Fentry)?;
            let result = program.load(candidate.function, btf).and_then(|()| program.attach().map(drop));
            if result.is_err() {
                let _ = program.unload();
            }
            result
        }
        At::Return => {
            let program: &mut FExit = program.try_into().map_err(AttachError::Fentry)?;
            let result = program.load(candidate.function, btf).and_then(|()| program.attach().map(drop));
            if result.is_err() {
                let _ = program.unload();
            }
            result
        }
    };
    result.map_err(AttachError::Fentry)
}

/// Detaches and unloads every program. Each detach waits for an RCU grace
/// period in the kernel; done one after another, that is a second or more
/// for all probes, so they are detached in parallel, sharing grace periods.
pub fn detach_all(ebpf: &mut Ebpf) {
    std::thread::scope(|scope| {
        for (_, program) in ebpf.programs_mut() {
            scope.spawn(move || {
                let _ = match program {
                    Program::KProbe(p) => p.unload(),
                    Program::FEntry(p) => p.unload(),
                    Program::FExit(p) => p.unload(),
                    Program::RawTracePoint(p) => p.unload(),
                    _ => Ok(()),
                };
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plain_and_suffixed_text_symbols() {
        let symbols = KernelSymbols::parse(
            "ffffffff81000000 T do_wp_page\n\
             ffffffff81000100 t wp_page_reuse.isra.0\n\
             ffffffff81000200 D folio_add_new_anon_rmap\n\
             ffffffff81000300 t folio_remove_rmap_ptes [some_module]\n\
             ffffffff82000000 D vmemmap_base\n"
                .to_owned(),
        );
        assert_eq!(symbols.vmemmap_base_address, 0xffffffff82000000);
        assert_eq!(symbols.find("do_wp_page").as_deref(), Some("do_wp_page"));
        assert_eq!(symbols.find("wp_page_reuse").as_deref(), Some("wp_page_reuse.isra.0"));
        assert_eq!(symbols.find("folio_add_new_anon_rmap"), None, "data symbols are not functions");
        assert_eq!(symbols.find("folio_remove_rmap_ptes").as_deref(), Some("folio_remove_rmap_ptes"));
        assert_eq!(symbols.find("wp_page"), None, "a prefix is not a match");
    }

    /// Every program the table names exists in the embedded object, with
    /// the attach type its candidate needs.
    #[test]
    fn table_matches_the_object() {
        use aya_obj::ProgramSection;
        let object = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("the embedded object parses");
        let section = |name: &str| {
            object
                .programs
                .get(name)
                .map(|p| p.section.clone())
                .unwrap_or_else(|| panic!("no program {name}"))
        };
        for candidate in PROBES.iter().flat_map(|s| s.candidates) {
            match candidate.at {
                At::Entry => {
                    assert!(
                        matches!(section(candidate.kprobe), ProgramSection::KProbe),
                        "{}",
                        candidate.kprobe
                    );
                    assert!(
                        matches!(section(candidate.fentry), ProgramSection::FEntry { .. }),
                        "{}",
                        candidate.fentry
                    );
                }
                At::Return => {
                    assert!(
                        matches!(section(candidate.kprobe), ProgramSection::KRetProbe),
                        "{}",
                        candidate.kprobe
                    );
                    assert!(
                        matches!(section(candidate.fentry), ProgramSection::FExit { .. }),
                        "{}",
                        candidate.fentry
                    );
                }
            }
        }
    }

    #[test]
    fn tracepoint_programs_are_in_the_object() {
        use aya_obj::ProgramSection;
        let object = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("the embedded object parses");
        for &name in TRACEPOINTS.iter().flat_map(|spec| spec.programs) {
            let section = &object.programs.get(name).expect("the program exists").section;
            assert!(matches!(section, ProgramSection::RawTracePoint), "{name}: {section:?}");
        }
    }

    /// An fentry program loads for one target: two logical probes must not
    /// share one (kprobes may).
    #[test]
    fn no_fentry_program_serves_two_probes() {
        for (i, a) in PROBES.iter().enumerate() {
            for b in &PROBES[i + 1..] {
                for ca in a.candidates {
                    assert!(
                        b.candidates.iter().all(|cb| cb.fentry != ca.fentry),
                        "{} is used by {} and {}",
                        ca.fentry,
                        a.name,
                        b.name
                    );
                }
            }
        }
    }

    #[test]
    fn every_probe_is_named_once() {
        let mut names: Vec<_> = PROBES.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PROBES.len());
    }
}
