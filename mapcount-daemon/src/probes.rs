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
    /// In order of preference: the first one that exists and attaches is used.
    pub candidates: &'static [Candidate],
    pub need: Need,
}

/// A kernel function and the program that understands its arguments.
pub struct Candidate {
    pub function: &'static str,
    pub program: &'static str,
}

macro_rules! candidates {
    ($($function:literal => $program:literal),+ $(,)?) => {
        &[$(Candidate { function: $function, program: $program }),+]
    };
}

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "anon_add_ptes",
        candidates: candidates!["folio_add_anon_rmap_ptes" => "add_anon_ptes"],
        need: Need::Core,
    },
    ProbeSpec {
        name: "anon_add_pmd",
        candidates: candidates!["folio_add_anon_rmap_pmd" => "add_anon_pmd"],
        need: Need::Optional,
    },
    ProbeSpec {
        name: "anon_add_new",
        candidates: candidates!["folio_add_new_anon_rmap" => "add_new_anon"],
        need: Need::Core,
    },
    ProbeSpec {
        name: "anon_add_new_return",
        candidates: candidates!["folio_add_new_anon_rmap" => "add_new_anon_return"],
        need: Need::Core,
    },
    ProbeSpec {
        name: "file_add_ptes",
        candidates: candidates!["folio_add_file_rmap_ptes" => "add_file_ptes"],
        need: Need::Core,
    },
    ProbeSpec {
        name: "file_add_pmd",
        candidates: candidates!["folio_add_file_rmap_pmd" => "add_file_pmd"],
        need: Need::Optional,
    },
    ProbeSpec {
        name: "file_add_pud",
        candidates: candidates!["folio_add_file_rmap_pud" => "add_file_pud"],
        need: Need::Optional,
    },
    ProbeSpec {
        name: "remove_ptes",
        candidates: candidates!["folio_remove_rmap_ptes" => "remove_ptes"],
        need: Need::Core,
    },
    ProbeSpec {
        name: "remove_pmd",
        candidates: candidates!["folio_remove_rmap_pmd" => "remove_pmd"],
        need: Need::Optional,
    },
    ProbeSpec {
        name: "remove_pud",
        candidates: candidates!["folio_remove_rmap_pud" => "remove_pud"],
        need: Need::Optional,
    },
    ProbeSpec {
        name: "write_fault",
        candidates: candidates!["do_wp_page" => "write_fault_entry"],
        need: Need::Core,
    },
    ProbeSpec {
        name: "write_fault_return",
        candidates: candidates!["do_wp_page" => "write_fault_return"],
        need: Need::Core,
    },
    // The reuse marker. wp_page_reuse is static and often not probe-able
    // (Debian 6.12 lists it in kallsyms but kprobes refuse it); inside the
    // write-fault window only the reuse path upgrades the PTE in place with
    // ptep_set_access_flags, copies install a new PTE.
    ProbeSpec {
        name: "write_fault_reuse",
        candidates: candidates!["wp_page_reuse" => "write_fault_reuse", "ptep_set_access_flags" => "write_fault_pte_reuse"],
        need: Need::Optional,
    },
    ProbeSpec {
        name: "write_fault_move_anon",
        candidates: candidates!["folio_move_anon_rmap" => "write_fault_move_anon"],
        need: Need::Optional,
    },
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
    Attached {
        function: String,
    },
    /// None of the candidate functions exists out of line in this kernel.
    NoFunction,
    /// The function exists but attaching failed (no kprobe support, lockdown, ...).
    AttachFailed {
        function: String,
        error: String,
    },
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

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut KProbe, ProbesError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProbesError::MissingProgram(name))
}

/// Loads every program (the verifier runs on each) without attaching.
pub fn load_all(ebpf: &mut Ebpf) -> Result<(), ProbesError> {
    for candidate in PROBES.iter().flat_map(|spec| spec.candidates) {
        let program = program(ebpf, candidate.program)?;
        if program.fd().is_err() {
            program.load().map_err(|source| ProbesError::Load {
                program: candidate.program,
                source,
            })?;
        }
    }
    Ok(())
}

/// Attaches every probe whose function exists; never fails because one is missing.
pub fn attach_all(ebpf: &mut Ebpf, symbols: &KernelSymbols) -> Result<Vec<ProbeReport>, ProbesError> {
    load_all(ebpf)?;
    let mut reports = Vec::with_capacity(PROBES.len());
    for spec in PROBES {
        let mut status = ProbeStatus::NoFunction;
        for candidate in spec.candidates {
            let Some(function) = symbols.find(candidate.function) else {
                continue;
            };
            match program(ebpf, candidate.program)?.attach(&function, 0) {
                Ok(_link) => {
                    status = ProbeStatus::Attached { function };
                    break;
                }
                // Keep trying later candidates; report the first failure if none attaches.
                Err(e) => {
                    if !matches!(status, ProbeStatus::AttachFailed { .. }) {
                        status = ProbeStatus::AttachFailed {
                            function,
                            error: error_chain(&e),
                        };
                    }
                }
            }
        }
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
        assert_eq!(
            symbols.find("wp_page_reuse").as_deref(),
            Some("wp_page_reuse.isra.0")
        );
        assert_eq!(
            symbols.find("folio_add_new_anon_rmap"),
            None,
            "data symbols are not functions"
        );
        assert_eq!(
            symbols.find("folio_remove_rmap_ptes").as_deref(),
            Some("folio_remove_rmap_ptes")
        );
        assert_eq!(symbols.find("wp_page"), None, "a prefix is not a match");
    }

    #[test]
    fn every_probe_is_named_once() {
        let mut names: Vec<_> = PROBES.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PROBES.len());
    }
}
