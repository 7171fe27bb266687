//! Which kernel functions the programs attach to, and attaching them.
//!
//! Each logical probe has an ordered list of candidate functions; the first
//! one the running kernel has out of line (listed in `/proc/kallsyms`,
//! possibly with a compiler suffix such as `.isra.0`) is used. A missing
//! optional probe only empties the metrics that need it.

use std::{collections::HashSet, fs, io};

use aya::{
    Ebpf,
    programs::{KProbe, ProgramError},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Without it the core metrics stay empty.
    Core,
    Optional,
}

pub struct ProbeSpec {
    /// Logical name: the `probe` label of `mapcount_probe_attached`.
    pub name: &'static str,
    /// The program in the eBPF object.
    pub program: &'static str,
    pub candidates: &'static [&'static str],
    pub need: Need,
}

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec { name: "anon_add_ptes", program: "add_anon_ptes", candidates: &["folio_add_anon_rmap_ptes"], need: Need::Core },
    ProbeSpec { name: "anon_add_pmd", program: "add_anon_pmd", candidates: &["folio_add_anon_rmap_pmd"], need: Need::Optional },
    ProbeSpec { name: "anon_add_new", program: "add_new_anon", candidates: &["folio_add_new_anon_rmap"], need: Need::Core },
    ProbeSpec { name: "anon_add_new_return", program: "add_new_anon_return", candidates: &["folio_add_new_anon_rmap"], need: Need::Core },
    ProbeSpec { name: "file_add_ptes", program: "add_file_ptes", candidates: &["folio_add_file_rmap_ptes"], need: Need::Core },
    ProbeSpec { name: "file_add_pmd", program: "add_file_pmd", candidates: &["folio_add_file_rmap_pmd"], need: Need::Optional },
    ProbeSpec { name: "file_add_pud", program: "add_file_pud", candidates: &["folio_add_file_rmap_pud"], need: Need::Optional },
    ProbeSpec { name: "remove_ptes", program: "remove_ptes", candidates: &["folio_remove_rmap_ptes"], need: Need::Core },
    ProbeSpec { name: "remove_pmd", program: "remove_pmd", candidates: &["folio_remove_rmap_pmd"], need: Need::Optional },
    ProbeSpec { name: "remove_pud", program: "remove_pud", candidates: &["folio_remove_rmap_pud"], need: Need::Optional },
    ProbeSpec { name: "write_fault", program: "write_fault_entry", candidates: &["do_wp_page"], need: Need::Core },
    ProbeSpec { name: "write_fault_return", program: "write_fault_return", candidates: &["do_wp_page"], need: Need::Core },
    ProbeSpec { name: "write_fault_reuse", program: "write_fault_reuse", candidates: &["wp_page_reuse"], need: Need::Optional },
    ProbeSpec { name: "write_fault_move_anon", program: "write_fault_move_anon", candidates: &["folio_move_anon_rmap"], need: Need::Optional },
];

/// Function names the kernel has out of line, from `/proc/kallsyms`.
pub struct KernelSymbols {
    names: HashSet<String>,
}

impl KernelSymbols {
    pub fn read() -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(kallsyms: &str) -> Self {
        let names = kallsyms
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_ascii_whitespace();
                let (_addr, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
                // Text symbols only; module symbols carry a "[module]" fourth field and are fine too.
                matches!(kind, "t" | "T").then(|| name.to_owned())
            })
            .collect();
        Self { names }
    }

    /// The symbol to attach to for `function`: the plain name, or the name
    /// with a compiler suffix (`.isra.0`, `.constprop.0`, ...).
    pub fn find(&self, function: &str) -> Option<String> {
        if self.names.contains(function) {
            return Some(function.to_owned());
        }
        let prefix = format!("{function}.");
        let mut suffixed: Vec<&String> = self.names.iter().filter(|n| n.starts_with(&prefix)).collect();
        suffixed.sort();
        suffixed.first().map(|s| (*s).clone())
    }
}

/// What happened to one logical probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeStatus {
    Attached { function: String },
    /// None of the candidate functions exists out of line in this kernel.
    NoFunction,
    /// The function exists but attaching failed (no kprobe support, lockdown, ...).
    AttachFailed { function: String, error: String },
}

pub struct ProbeReport {
    pub spec: &'static ProbeSpec,
    pub status: ProbeStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbesError {
    #[error("the eBPF object has no program {0}; the daemon and the object are out of step")]
    MissingProgram(&'static str),
    #[error("program {program} failed to load: {source}")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// Loads every program (the verifier runs on each) without attaching.
pub fn load_all(ebpf: &mut Ebpf) -> Result<(), ProbesError> {
    for spec in PROBES {
        let program: &mut KProbe = ebpf
            .program_mut(spec.program)
            .and_then(|p| p.try_into().ok())
            .ok_or(ProbesError::MissingProgram(spec.program))?;
        if program.fd().is_err() {
            program.load().map_err(|source| ProbesError::Load { program: spec.program, source })?;
        }
    }
    Ok(())
}

/// Attaches every probe whose function exists; never fails because one is missing.
pub fn attach_all(ebpf: &mut Ebpf, symbols: &KernelSymbols) -> Result<Vec<ProbeReport>, ProbesError> {
    load_all(ebpf)?;
    let mut reports = Vec::with_capacity(PROBES.len());
    for spec in PROBES {
        let program: &mut KProbe = ebpf
            .program_mut(spec.program)
            .and_then(|p| p.try_into().ok())
            .ok_or(ProbesError::MissingProgram(spec.program))?;
        let status = match spec.candidates.iter().find_map(|c| symbols.find(c)) {
            None => ProbeStatus::NoFunction,
            Some(function) => match program.attach(&function, 0) {
                Ok(_link) => ProbeStatus::Attached { function },
                Err(e) => ProbeStatus::AttachFailed { function, error: error_chain(&e) },
            },
        };
        reports.push(ProbeReport { spec, status });
    }
    Ok(reports)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plain_and_suffixed_text_symbols() {
        let symbols = KernelSymbols::parse(
            "ffffffff81000000 T do_wp_page\n\
             ffffffff81000100 t wp_page_reuse.isra.0\n\
             ffffffff81000200 D folio_add_new_anon_rmap\n\
             ffffffff81000300 t folio_remove_rmap_ptes [some_module]\n",
        );
        assert_eq!(symbols.find("do_wp_page").as_deref(), Some("do_wp_page"));
        assert_eq!(symbols.find("wp_page_reuse").as_deref(), Some("wp_page_reuse.isra.0"));
        assert_eq!(symbols.find("folio_add_new_anon_rmap"), None, "data symbols are not functions");
        assert_eq!(symbols.find("folio_remove_rmap_ptes").as_deref(), Some("folio_remove_rmap_ptes"));
        assert_eq!(symbols.find("wp_page"), None, "a prefix is not a match");
    }

    #[test]
    fn every_program_is_named_once_per_probe() {
        let mut names: Vec<_> = PROBES.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PROBES.len());
    }
}
