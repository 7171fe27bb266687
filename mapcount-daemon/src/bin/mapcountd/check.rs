//! `mapcountd check`: what would be attached on this kernel (or a BTF file)
//! and the resolved field offsets.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use mapcount_daemon::{
    config::Wakeup,
    layout::{self, DEFAULT_BTF_PATH},
    object,
    probes::{self, KernelSymbols, Need, When},
};

pub(crate) fn check(btf_path: Option<PathBuf>, load: bool) -> anyhow::Result<ExitCode> {
    let path = btf_path.clone().unwrap_or_else(|| DEFAULT_BTF_PATH.into());
    let btf = layout::load_btf(&path)?;
    let resolved = layout::resolve(&btf)?;
    println!("BTF: {}", path.display());
    println!("\n{:<32} {:<18} {:>7}  consequence", "field", "member", "offset");
    for f in &resolved.fields {
        let offset = f.offset.map_or("absent".to_owned(), |o| o.to_string());
        let consequence = if f.offset.is_none() { layout::consequence(f.slot) } else { "" };
        println!("{:<32} {:<18} {:>7}  {consequence}", f.slot, f.member.unwrap_or("-"), offset);
    }
    println!(
        "\npointer fields (vma->vm_mm, current->mm): {}",
        if resolved.layout.typed_pointer_loads != 0 {
            "plain loads (BTF sorted by name: the verifier checks them by binary search)"
        } else {
            "read by a helper (BTF not sorted by name: the verifier would search it linearly at each load)"
        }
    );

    // With a BTF file, a function counts as present when BTF describes it;
    // on the running kernel, when it is in /proc/kallsyms (out of line).
    let symbols = match &btf_path {
        Some(_) => None,
        None => Some(KernelSymbols::read().context("reading /proc/kallsyms")?),
    };
    let traceable = if btf_path.is_none() { KernelSymbols::traceable() } else { None };
    let kprobes_possible =
        btf_path.is_some() || Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    let mut core_missing = 0;
    println!("\n{:<24} {:<30} {:<8} {:<8} empty without it", "probe", "function", "mode", "need");
    let whole_fault = match &symbols {
        Some(symbols) => probes::whole_fault_windows(symbols),
        None => !layout::has_function(&btf, "do_wp_page"),
    };
    for spec in probes::PROBES {
        if spec.when == When::WholeFaultWindows && !whole_fault {
            println!(
                "{:<24} {:<30} {:<8} {:<8} (only where do_wp_page is inlined)",
                spec.name, "-", "-", "-"
            );
            continue;
        }
        let found = spec.candidates.iter().find_map(|c| {
            let function = match &symbols {
                Some(symbols) => symbols.find(c.function)?,
                None => layout::has_function(&btf, c.function).then(|| c.function.to_owned())?,
            };
            let fentry = layout::fentry_can_attach(&btf, c.function)
                && traceable.as_ref().is_none_or(|t| t.contains(c.function));
            Some((function, fentry))
        });
        let (function, mode) = match &found {
            Some((f, true)) => (f.as_str(), "fentry"),
            Some((f, false)) => (f.as_str(), "kprobe"),
            None => ("MISSING", "-"),
        };
        let need = if spec.need == Need::Core { "core" } else { "optional" };
        if found.is_none() && spec.need == Need::Core {
            core_missing += 1;
        }
        let feeds = if found.is_none() { spec.feeds } else { "" };
        println!("{:<24} {:<30} {:<8} {:<8} {feeds}", spec.name, function, mode, need);
    }
    for spec in probes::TRACEPOINTS {
        let (tracepoint, mode, feeds) = match (spec.program_for)(&resolved.layout) {
            Some(_) => (spec.tracepoint, "tracepoint", ""),
            None => ("UNREADABLE", "-", spec.feeds),
        };
        println!("{:<24} {:<30} {:<8} {:<8} {feeds}", spec.name, tracepoint, mode, "optional");
    }
    println!(
        "\nwrite faults: {}",
        if whole_fault {
            "do_wp_page is inlined: classified over handle_mm_fault (a COW is a cleared present PTE and a new anonymous folio)"
        } else {
            "classified inside do_wp_page"
        }
    );
    println!(
        "\nmode: fentry where BTF describes the function and ftrace can trace it{}; else kprobe",
        if traceable.is_none() { " (tracefs not readable: assumed)" } else { "" }
    );
    if !kprobes_possible {
        println!("this kernel has no kprobe PMU (CONFIG_KPROBES=n): kprobes cannot attach");
    }
    if load {
        let mut ebpf = object::load(&resolved.layout, 1 << 16, Wakeup::Batch, false, 0)?;
        let _logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up eBPF logging")?;
        let loaded = probes::load_kprobes(&mut ebpf)?;
        let tracepoints = probes::load_tracepoint_programs(&mut ebpf)?;
        println!(
            "\nverifier: {loaded} kprobe and {tracepoints} tracepoint programs loaded into this kernel (not attached)"
        );
    }
    Ok(if core_missing == 0 && kprobes_possible { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
