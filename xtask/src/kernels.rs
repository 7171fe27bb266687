//! Stock Debian kernels for the VM tests, fetched from Debian's archive with
//! a private apt configuration (the system's sources stay untouched) and
//! cached.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::workspace::{cache_dir, download_with_progress, package_size, run_cmd};

pub struct KernelSpec {
    /// Short name used on the command line.
    pub name: &'static str,
    /// Debian suites to search; `-security` suites come from the security archive.
    pub suites: &'static [&'static str],
    /// Package name pattern: `{prefix}<version>{suffix}`; the newest matching package is used.
    pub prefix: &'static str,
    pub suffix: &'static str,
    /// Extra package with the modules, when the image package has none.
    pub modules_prefix: Option<&'static str>,
}

/// The VM matrix: the oldest supported generation (page_* rmap functions),
/// the current stable one and the newest (mm ids, PUD rmap functions).
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        suites: &["bookworm", "bookworm-security"],
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64-unsigned",
        modules_prefix: None,
    },
    KernelSpec {
        name: "6.12",
        suites: &["trixie"],
        prefix: "linux-image-6.12.",
        suffix: "+deb13-cloud-amd64-unsigned",
        modules_prefix: None,
    },
    KernelSpec {
        name: "7.3",
        suites: &["trixie-backports"],
        prefix: "linux-binary-7.3.",
        suffix: "+deb13-cloud-amd64",
        modules_prefix: Some("linux-modules-7.3."),
    },
];

pub fn find(name: &str) -> anyhow::Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name).with_context(|| {
        let known: Vec<_> = KERNELS.iter().map(|k| k.name).collect();
        format!("unknown kernel {name}; known: {}", known.join(", "))
    })
}

/// An unpacked kernel package.
pub struct Kernel {
    pub name: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the unpacked package(s).
    pub modules: PathBuf,
}

/// A kernel of the kind MM developers build themselves: Debian's 7.3
/// source with a small configuration (`xtask/kernel/small.config`), in
/// which gcc inlines static functions such as do_wp_page into their callers.
pub const SMALL: &str = "7.3-small";

/// A kernel of the matrix by name: Debian's build, or [`SMALL`] built here.
pub fn get(name: &str) -> anyhow::Result<Kernel> {
    if name == SMALL { build_small() } else { fetch(find(name)?) }
}

/// A kernel given by the path of its image (a developer's own build), with
/// its `lib/modules/<release>` directory if it has modules. Named after the
/// image's size and modification time, so that a rebuilt kernel gets its
/// own extracted BTF and initramfs in the cache.
pub fn from_path(image: &Path, modules: Option<&Path>) -> anyhow::Result<Kernel> {
    let meta = fs::metadata(image).with_context(|| format!("{}: no such kernel image", image.display()))?;
    if !meta.is_file() {
        bail!("{}: not a kernel image file", image.display());
    }
    if let Some(dir) = modules
        && !dir.join("kernel").is_dir()
    {
        bail!("{}: not a modules directory (it has no kernel/ inside)", dir.display());
    }
    let modified = meta.modified()?.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(Kernel {
        name: format!("image-{}-{modified}", meta.len()),
        vmlinuz: image.canonicalize()?,
        modules: modules.map(Path::to_path_buf).unwrap_or_default(),
    })
}

fn build_small() -> anyhow::Result<Kernel> {
    let config = include_str!("../kernel/small.config");
    let dir = cache_dir().join("kernels").join(SMALL);
    let kernel =
        Kernel { name: SMALL.to_owned(), vmlinuz: dir.join("bzImage"), modules: dir.join("modules") };
    let stamp = dir.join("config.built");
    // Comments in the config do not call for a new build.
    let settings = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    if kernel.vmlinuz.exists()
        && fs::read_to_string(&stamp).is_ok_and(|built| settings(&built) == settings(config))
    {
        return Ok(kernel);
    }
    fs::create_dir_all(&kernel.modules)?;
    println!("kernel {SMALL}: downloading and unpacking linux-source-7.3");
    let src = source_tree("7.3", &dir)?;
    println!("kernel {SMALL}: building (tinyconfig and xtask/kernel/small.config)");
    fs::write(src.join("small.config"), config)?;
    let build = "make -s tinyconfig >/dev/null \
        && ./scripts/kconfig/merge_config.sh -m -O . .config small.config >/dev/null \
        && make -s olddefconfig \
        && make -s -j\"$(nproc)\" bzImage";
    run_cmd(Command::new("sh").current_dir(&src).args(["-c", build]))?;
    fs::copy(src.join("arch/x86/boot/bzImage"), &kernel.vmlinuz)?;
    run_cmd(
        Command::new("objcopy")
            .args(["-O", "binary", "--only-section=.BTF"])
            .arg(src.join("vmlinux"))
            .arg(dir.join("vmlinux.btf")),
    )?;
    fs::write(&stamp, config)?;
    Ok(kernel)
}

pub fn fetch(spec: &KernelSpec) -> anyhow::Result<Kernel> {
    let dir = cache_dir().join("kernels").join(spec.name);
    let unpacked = dir.join("root");
    if let Some(kernel) = locate(spec, &unpacked)? {
        return Ok(kernel);
    }
    fs::create_dir_all(&dir)?;
    let apt = PrivateApt::new(&cache_dir().join("apt"), spec.name, spec.suites)?;
    let mut packages = vec![apt.newest(spec.prefix, spec.suffix)?];
    if let Some(modules_prefix) = spec.modules_prefix {
        packages.push(apt.newest(modules_prefix, spec.suffix)?);
    }
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked)?;
    for package in &packages {
        println!("kernel {}: downloading {package}", spec.name);
        let deb = apt.download(package, &dir)?;
        run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    locate(spec, &unpacked)?.with_context(|| format!("no vmlinuz in {}", packages.join(", ")))
}

fn locate(spec: &KernelSpec, root: &Path) -> anyhow::Result<Option<Kernel>> {
    let boot = root.join("boot");
    let mut vmlinuz = None;
    if let Ok(entries) = fs::read_dir(&boot) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
                vmlinuz = Some(e.path());
            }
        }
    }
    let modules_root = root.join("usr/lib/modules");
    let modules_root = if modules_root.exists() { modules_root } else { root.join("lib/modules") };
    let release_dir =
        fs::read_dir(&modules_root).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).map(|e| e.path());
    let Some(modules) = release_dir else {
        return Ok(None);
    };
    if vmlinuz.is_none() && modules.join("vmlinuz").exists() {
        vmlinuz = Some(modules.join("vmlinuz"));
    }
    Ok(vmlinuz.map(|vmlinuz| Kernel { name: spec.name.to_owned(), vmlinuz, modules }))
}

/// Debian's `linux-source-<name>` unpacked in `dir` (downloaded and
/// unpacked once); returns the tree's root.
pub fn source_tree(name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let package = format!("linux-source-{name}");
    let src = dir.join(&package);
    if !src.join("Makefile").exists() {
        let deb = download_source(name, &package, dir)?;
        let script = format!(
            "cd '{}' && dpkg-deb --fsys-tarfile '{}' | tar -xO ./usr/src/{package}.tar.xz | tar -xJ",
            dir.display(),
            deb.display()
        );
        run_cmd(Command::new("sh").args(["-c", &script]))?;
    }
    Ok(src)
}

/// Downloads a source package of the kernel generation `name` (the same
/// suites as its image) into `dir`; returns the .deb.
pub fn download_source(name: &str, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let spec = find(name)?;
    if let Some(deb) = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
    {
        return Ok(deb);
    }
    let apt = PrivateApt::new(&cache_dir().join("apt"), spec.name, spec.suites)?;
    apt.download(package, dir)
}

struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(dir: &Path, name: &str, suites: &[&str]) -> anyhow::Result<Self> {
        let lists = dir.join(format!("lists-{name}"));
        let cache = dir.join(format!("cache-{name}"));
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(cache.join("archives/partial"))?;
        let (archive, security) = archive_uris()?;
        let sources = dir.join(format!("{name}.list"));
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let lines: String = suites
            .iter()
            .map(|suite| {
                let uri = if suite.ends_with("-security") { &security } else { &archive };
                format!("deb [signed-by={keyring}] {uri} {suite} main\n")
            })
            .collect();
        fs::write(&sources, lines)?;
        let options = vec![
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            "Dir::State::status=/dev/null".to_owned(),
            // Downloads land in our own cache directory, which _apt cannot write.
            "APT::Sandbox::User=root".to_owned(),
        ];
        let apt = Self { options };
        run_cmd(apt.cmd("apt-get").args(["update", "-qq"]))?;
        Ok(apt)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        cmd
    }

    /// The newest package named `{prefix}<version>{suffix}`.
    fn newest(&self, prefix: &str, suffix: &str) -> anyhow::Result<String> {
        let out = self.cmd("apt-cache").args(["pkgnames", prefix]).output()?;
        let names = String::from_utf8_lossy(&out.stdout);
        let mut candidates: Vec<&str> = names.lines().filter(|n| n.ends_with(suffix)).collect();
        candidates.sort_by_key(|n| version_key(&n[prefix.len()..n.len() - suffix.len()]));
        match candidates.last() {
            Some(n) => Ok((*n).to_owned()),
            None => bail!("no package {prefix}*{suffix} in Debian's archive"),
        }
    }

    fn download(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        let size = package_size(self.cmd("apt-cache"), package);
        download_with_progress(
            self.cmd("apt-get").current_dir(dir).args(["download", "-qq", package]),
            package,
            dir,
            size,
        )?;
        fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }
}

/// Numeric components of a version, for ordering "117" after "99".
fn version_key(version: &str) -> Vec<u64> {
    version.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect()
}

/// The Debian archive and security archive this machine already uses.
pub fn archive_uris() -> anyhow::Result<(String, String)> {
    let mut uris: Vec<String> = Vec::new();
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    uris.extend(
        sources
            .lines()
            .filter_map(|l| l.strip_prefix("URIs:"))
            .flat_map(|u| u.split_whitespace())
            .map(str::to_owned),
    );
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    uris.extend(
        list.lines()
            .filter(|l| l.starts_with("deb "))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("http")).map(str::to_owned)),
    );
    let archive = uris
        .iter()
        .find(|u| !u.contains("security"))
        .cloned()
        .context("cannot find the Debian archive URI in the apt sources")?;
    let security = uris
        .iter()
        .find(|u| u.contains("security"))
        .cloned()
        .unwrap_or_else(|| format!("{}-security", archive.trim_end_matches('/')));
    Ok((archive, security))
}

/// The kernel's own BTF, cut out of its vmlinuz: find the compressed
/// payload by its magic, decompress it to the ELF vmlinux, take `.BTF`.
pub fn extract_btf(kernel: &Kernel) -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join("kernels").join(&kernel.name);
    let btf = dir.join("vmlinux.btf");
    if btf.exists() {
        return Ok(btf);
    }
    fs::create_dir_all(&dir)?;
    let image = fs::read(&kernel.vmlinuz)?;
    const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
    const LZ4_LEGACY: &[u8] = &[0x02, 0x21, 0x4c, 0x18];
    let find = |magic: &[u8]| image.windows(magic.len()).position(|w| w == magic);
    let (offset, tool) = match (find(ZSTD), find(LZ4_LEGACY)) {
        (Some(z), Some(l)) if l < z => (l, "lz4"),
        (Some(z), _) => (z, "zstd"),
        (None, Some(l)) => (l, "lz4"),
        (None, None) => bail!("{}: no zstd or LZ4 payload", kernel.vmlinuz.display()),
    };
    let payload = dir.join("payload");
    fs::write(&payload, &image[offset..])?;
    let elf = dir.join("vmlinux.elf");
    // The payload is followed by the rest of the bzImage: the decompressor
    // complains about trailing bytes after writing the whole ELF, so its
    // exit status is not the test; the ELF magic is.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("{tool} -dc '{}' > '{}' 2>/dev/null", payload.display(), elf.display()))
        .status()?;
    let head = fs::read(&elf).map(|b| b.get(..4).map(<[u8]>::to_vec)).unwrap_or_default();
    if head.as_deref() != Some(b"\x7fELF".as_slice()) {
        bail!("decompressing {} with {tool} gave no ELF", kernel.vmlinuz.display());
    }
    run_cmd(Command::new("objcopy").args(["-O", "binary", "--only-section=.BTF"]).arg(&elf).arg(&btf))?;
    if fs::metadata(&btf).map_or(0, |m| m.len()) == 0 {
        let _ = fs::remove_file(&btf);
        bail!("{}: the kernel has no BTF (it needs CONFIG_DEBUG_INFO_BTF=y)", kernel.vmlinuz.display());
    }
    let _ = fs::remove_file(&payload);
    let _ = fs::remove_file(&elf);
    Ok(btf)
}
