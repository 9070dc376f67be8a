//! The VM configuration.
//!
//! One set of types serves the JSON config file (`vmm --config FILE`), the
//! `vmm` command line (`--disk path=...,readonly=on`), the `vm.create` request
//! body, `vm.info`, and the migration payload. Every struct rejects unknown
//! fields and has a `validate()` whose error names the offending field.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The largest number of vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// The smallest guest memory the boot layout fits into.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// A configuration error: which field is wrong and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as a dotted path (`disks[1].path`) or a command-line option.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error seen from an enclosing field, e.g. `path` -> `disks[0].path`.
    pub fn within(self, prefix: &str) -> Self {
        ConfigError {
            field: format!("{prefix}.{}", self.field),
            message: self.message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

pub type ConfigResult<T> = Result<T, ConfigError>;

/// The whole VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The guest's name, shown by `vm.info`, `vmm.ping` and `vmmctl`;
    /// default: the API socket's name (`web1` for `/run/vmm/web1.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// What a guest reset (i8042 or 0xCF9 reset, triple fault) does.
    #[serde(default)]
    pub on_reset: ResetAction,
}

impl VmConfig {
    /// Parse a JSON document (config file or API body) and validate it.
    pub fn from_json(text: &[u8]) -> ConfigResult<VmConfig> {
        let config: VmConfig = from_json(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Whether guest RAM gets transparent huge pages: as `memory.thp` says,
    /// or by default for anonymous memory of guests without a balloon or KSM
    /// merging (huge pages give memory back only whole).
    pub fn transparent_huge_pages(&self) -> bool {
        self.memory.thp.unwrap_or(
            self.memory.backing == MemoryBacking::Anonymous
                && !self.memory.mergeable
                && self.balloon.is_none(),
        )
    }

    /// Checks every field; assigns default device ids where none were given.
    pub fn validate(&self) -> ConfigResult<()> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        self.cpus.validate().map_err(|e| e.within("cpus"))?;
        self.memory.validate().map_err(|e| e.within("memory"))?;
        self.payload.validate().map_err(|e| e.within("payload"))?;
        self.serial.validate().map_err(|e| e.within("serial"))?;
        let mut ids = std::collections::BTreeSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            disk.validate().map_err(|e| e.within(&field))?;
            if let Some(id) = &disk.id {
                if !ids.insert(id.clone()) {
                    return Err(ConfigError::new(
                        format!("{field}.id"),
                        format!("id {id:?} is used twice"),
                    ));
                }
            }
        }
        for (i, net) in self.nets.iter().enumerate() {
            let field = format!("nets[{i}]");
            net.validate().map_err(|e| e.within(&field))?;
            if let Some(id) = &net.id {
                if !ids.insert(id.clone()) {
                    return Err(ConfigError::new(
                        format!("{field}.id"),
                        format!("id {id:?} is used twice"),
                    ));
                }
            }
        }
        if let Some(id) = &self.payload.boot_disk {
            if self.boot_disk_index().is_none() {
                let known: Vec<String> = (0..self.disks.len()).map(|i| self.disk_id(i)).collect();
                return Err(ConfigError::new(
                    "payload.boot_disk",
                    format!("no disk has id {id:?} (disks: {})", known.join(", ")),
                ));
            }
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate().map_err(|e| e.within("balloon"))?;
            if self.memory.backing == MemoryBacking::Hugetlbfs {
                // The guest gives back 4 KiB pages; hugetlbfs frees only whole
                // 2 MiB ones, so inflating would return nothing.
                return Err(ConfigError::new(
                    "balloon",
                    "cannot return memory from hugetlbfs-backed guest RAM: use backing anonymous or memfd",
                ));
            }
            if balloon.target_mib > self.memory.size_mib {
                return Err(ConfigError::new(
                    "balloon.target_mib",
                    format!(
                        "must be at most the guest's memory, {} MiB (got {})",
                        self.memory.size_mib, balloon.target_mib
                    ),
                ));
            }
            // The balloon device is named `balloon` in vm.counters and in
            // migration state.
            let taken = self.disks.iter().map(|d| ("disks", &d.id));
            let taken = taken.chain(self.nets.iter().map(|n| ("nets", &n.id)));
            for (i, (list, id)) in taken.enumerate() {
                if id.as_deref() == Some(BALLOON_DEVICE_ID) {
                    let i = if list == "disks" {
                        i
                    } else {
                        i - self.disks.len()
                    };
                    return Err(ConfigError::new(
                        format!("{list}[{i}].id"),
                        format!("{BALLOON_DEVICE_ID:?} is the balloon device's id"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The id disk `i` has or gets (`disk{i}` when none is given).
    pub fn disk_id(&self, i: usize) -> String {
        match self.disks.get(i).and_then(|d| d.id.clone()) {
            Some(id) => id,
            None => format!("disk{i}"),
        }
    }

    /// Which disk `payload.boot_disk` names, if any.
    pub fn boot_disk_index(&self) -> Option<usize> {
        let id = self.payload.boot_disk.as_ref()?;
        (0..self.disks.len()).find(|&i| &self.disk_id(i) == id)
    }

    /// Fills in the ids of disks and nets that have none (`disk0`, `net0`, ...),
    /// so every device has a stable name in `vm.info` and `vm.counters`.
    pub fn assign_device_ids(&mut self) {
        for (i, disk) in self.disks.iter_mut().enumerate() {
            disk.id.get_or_insert_with(|| format!("disk{i}"));
        }
        for (i, net) in self.nets.iter_mut().enumerate() {
            net.id.get_or_insert_with(|| format!("net{i}"));
        }
    }
}

/// Parses a JSON document into `T`; an error names the field path
/// (`payload.kernel`) or, for malformed JSON, the line and column.
pub fn from_json<T: serde::de::DeserializeOwned>(text: &[u8]) -> ConfigResult<T> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // "." is the document itself: name the position instead.
        if path == "." {
            json_error(inner)
        } else {
            ConfigError::new(path, inner.to_string())
        }
    })?;
    deserializer.end().map_err(json_error)?;
    Ok(value)
}

/// Turns a serde_json error into a config error that names the place.
pub fn json_error(e: serde_json::Error) -> ConfigError {
    let field = format!("line {} column {}", e.line(), e.column());
    ConfigError::new(field, e.to_string())
}

/// The vCPUs and their share of the host's CPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    #[serde(default = "default_vcpus")]
    pub boot_vcpus: u8,
    /// The guest's CPU weight against other guests when the host's CPUs are
    /// busy (1-10000, 100 is the usual share): its VMM's cgroup `cpu.weight`
    /// (`cpu.shares` = weight × 1024 / 100 on cgroup v1). Unset: no cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// A cap on the VMM's CPU time, in percent of one host CPU (150 = one
    /// and a half CPUs): its cgroup's `cpu.max` (`cpu.cfs_quota_us`). Unset:
    /// no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_percent: Option<u32>,
    /// The host CPUs the vCPU threads may run on, as a CPU list (`0-1,3`);
    /// the VMM's other threads stay unpinned. Unset: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
}

fn default_vcpus() -> u8 {
    1
}

/// The range of `cpus.weight` (cgroup v2's `cpu.weight`).
pub const CPU_WEIGHT_MIN: u32 = 1;
pub const CPU_WEIGHT_MAX: u32 = 10_000;
/// The weight of a guest that sets none (as cgroup v2's default).
pub const CPU_WEIGHT_DEFAULT: u32 = 100;
/// The largest `cpus.max_percent`: 1024 host CPUs.
pub const CPU_MAX_PERCENT_MAX: u32 = 100 * 1024;
/// Host CPU numbers in `cpus.affinity` are below this (glibc's CPU_SETSIZE).
pub const MAX_HOST_CPUS: usize = 1024;

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: default_vcpus(),
            weight: None,
            max_percent: None,
            affinity: None,
        }
    }
}

impl CpusConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        if self.boot_vcpus == 0 || self.boot_vcpus > MAX_VCPUS {
            return Err(ConfigError::new(
                "boot_vcpus",
                format!(
                    "must be between 1 and {MAX_VCPUS} (got {})",
                    self.boot_vcpus
                ),
            ));
        }
        if let Some(weight) = self.weight {
            if !(CPU_WEIGHT_MIN..=CPU_WEIGHT_MAX).contains(&weight) {
                return Err(ConfigError::new(
                    "weight",
                    format!(
                        "must be between {CPU_WEIGHT_MIN} and {CPU_WEIGHT_MAX} (got {weight}; \
                         {CPU_WEIGHT_DEFAULT} is the usual share)"
                    ),
                ));
            }
        }
        if let Some(percent) = self.max_percent {
            if !(1..=CPU_MAX_PERCENT_MAX).contains(&percent) {
                return Err(ConfigError::new(
                    "max_percent",
                    format!(
                        "must be between 1 and {CPU_MAX_PERCENT_MAX} percent of one host CPU \
                         (got {percent})"
                    ),
                ));
            }
        }
        if let Some(list) = &self.affinity {
            parse_cpu_list(list)?;
        }
        Ok(())
    }

    /// Whether the guest asks for a cgroup of its own (a weight or a cap).
    pub fn wants_cgroup(&self) -> bool {
        self.weight.is_some() || self.max_percent.is_some()
    }

    /// The host CPUs of `affinity`, ascending (None: unpinned). The config
    /// was validated, so the list parses.
    pub fn affinity_cpus(&self) -> Option<Vec<usize>> {
        self.affinity
            .as_deref()
            .and_then(|l| parse_cpu_list(l).ok())
    }

    /// Parses the command-line form: `N` (the vCPU count), or
    /// `boot=N[,weight=W][,max_percent=P][,affinity=LIST]` where LIST is a
    /// CPU list whose own commas need no quoting (`affinity=0-1,3`).
    pub fn parse(text: &str) -> ConfigResult<CpusConfig> {
        let mut cpus = CpusConfig::default();
        if text.is_empty() {
            return Err(ConfigError::new(
                "--cpus",
                "needs N or boot=N[,weight=W][,max_percent=P][,affinity=LIST]",
            ));
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            cpus.boot_vcpus = parse_number("--cpus", text)?;
        } else {
            // An item without `=` after `affinity=` continues its CPU list.
            let mut items: Vec<String> = Vec::new();
            for item in text.split(',') {
                match items.last_mut() {
                    Some(last) if !item.contains('=') && last.starts_with("affinity=") => {
                        last.push(',');
                        last.push_str(item);
                    }
                    _ => items.push(item.to_string()),
                }
            }
            let mut pairs: Vec<(&str, &str)> = Vec::new();
            for item in items.iter().filter(|s| !s.is_empty()) {
                let (key, value) = item.split_once('=').ok_or_else(|| {
                    ConfigError::new("--cpus", format!("{item:?} is not of the form key=value"))
                })?;
                if pairs.iter().any(|(k, _)| *k == key) {
                    return Err(ConfigError::new("--cpus", format!("{key} is given twice")));
                }
                pairs.push((key, value));
            }
            for (key, value) in pairs {
                let field = || format!("--cpus {key}");
                match key {
                    "boot" | "boot_vcpus" => cpus.boot_vcpus = parse_number(&field(), value)?,
                    "weight" => cpus.weight = Some(parse_number(&field(), value)?),
                    "max_percent" => cpus.max_percent = Some(parse_number(&field(), value)?),
                    "affinity" => cpus.affinity = Some(value.to_string()),
                    _ => return Err(unknown_key("--cpus", key)),
                }
            }
        }
        cpus.validate().map_err(|e| e.within("--cpus"))?;
        Ok(cpus)
    }
}

/// Parses a Linux CPU list (`0-3,8,10-11`) into ascending CPU numbers,
/// each below [`MAX_HOST_CPUS`]; errors name the field `affinity`.
pub fn parse_cpu_list(text: &str) -> ConfigResult<Vec<usize>> {
    let bad = |why: &str| {
        ConfigError::new(
            "affinity",
            format!("{text:?} is not a CPU list like 0-1,3: {why}"),
        )
    };
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut cpus = std::collections::BTreeSet::new();
    for item in text.split(',') {
        let (first, last) = item.split_once('-').unwrap_or((item, item));
        let number = |s: &str| -> ConfigResult<usize> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(&format!("{item:?} is not N or N-M")));
            }
            match s.parse::<usize>() {
                Ok(n) if n < MAX_HOST_CPUS => Ok(n),
                _ => Err(bad(&format!("CPU numbers are below {MAX_HOST_CPUS}"))),
            }
        };
        let (first, last) = (number(first)?, number(last)?);
        if first > last {
            return Err(bad(&format!("{item:?} is a range backwards")));
        }
        cpus.extend(first..=last);
    }
    Ok(cpus.into_iter().collect())
}

/// Writes CPU numbers as a CPU list (`0-1,3`), as the kernel does.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Where guest RAM comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBacking {
    /// Private anonymous mapping (the default; the only one KSM merges).
    #[default]
    Anonymous,
    /// A memfd, shared mapping.
    Memfd,
    /// A memfd on hugetlbfs (2 MiB pages); the host must have them reserved.
    Hugetlbfs,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    #[serde(default = "default_memory_mib")]
    pub size_mib: u64,
    #[serde(default)]
    pub backing: MemoryBacking,
    /// Mark guest RAM MADV_MERGEABLE so KSM may merge identical pages.
    #[serde(default)]
    pub mergeable: bool,
    /// Transparent huge pages for anonymous guest RAM (MADV_HUGEPAGE).
    /// Unset: on, except for guests with a balloon or KSM merging, where
    /// 2 MiB pages would keep memory the host wants back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thp: Option<bool>,
    /// The guest may be bigger than the host's RAM plus swap (memory is
    /// only backed when touched): without it such a guest is refused.
    /// A host-side choice: the migration source leaves it out of the
    /// config it sends (the target's host decides for itself).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overcommit: bool,
}

fn default_memory_mib() -> u64 {
    128
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size_mib: default_memory_mib(),
            backing: MemoryBacking::default(),
            mergeable: false,
            thp: None,
            overcommit: false,
        }
    }
}

impl MemoryConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        if self.size_mib < MIN_MEMORY_MIB || self.size_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::new(
                "size_mib",
                format!(
                    "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB (got {})",
                    self.size_mib
                ),
            ));
        }
        if self.backing == MemoryBacking::Hugetlbfs && self.size_mib % 2 != 0 {
            return Err(ConfigError::new(
                "size_mib",
                "must be a multiple of 2 MiB with hugetlbfs backing",
            ));
        }
        if self.mergeable && self.backing != MemoryBacking::Anonymous {
            return Err(ConfigError::new(
                "mergeable",
                "KSM only merges anonymous memory: use backing \"anonymous\"",
            ));
        }
        if self.thp == Some(true) && self.backing != MemoryBacking::Anonymous {
            return Err(ConfigError::new(
                "thp",
                "transparent huge pages apply to anonymous memory only \
                 (hugetlbfs is huge pages already)",
            ));
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_mib << 20
    }
}

/// What to boot: a kernel file on the host (`kernel`, `initrd`), or what the
/// guest's own disk would boot (`boot_disk`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// A Linux bzImage, or an ELF (vmlinux or the test guest; PVH entry if it has one).
    /// Empty when `boot_disk` is set.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub kernel: PathBuf,
    /// Added to the kernel command line (after the guest's own settings
    /// with `boot_disk`).
    #[serde(default)]
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Boot the kernel and initrd found on this disk (an id in `disks`),
    /// with the guest's own command line settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_disk: Option<String>,
}

fn path_is_empty(path: &std::path::Path) -> bool {
    path.as_os_str().is_empty()
}

/// The longest kernel command line accepted, including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 4096;

impl PayloadConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        match &self.boot_disk {
            None if self.kernel.as_os_str().is_empty() => {
                return Err(ConfigError::new(
                    "kernel",
                    "a kernel image path (or boot_disk) is required",
                ));
            }
            None => {}
            Some(_) if !self.kernel.as_os_str().is_empty() => {
                return Err(ConfigError::new(
                    "boot_disk",
                    "cannot be combined with kernel: the kernel comes from the disk",
                ));
            }
            Some(_) if self.initrd.is_some() => {
                return Err(ConfigError::new(
                    "initrd",
                    "cannot be combined with boot_disk: the initrd comes from the disk",
                ));
            }
            Some(id) if id.is_empty() => {
                return Err(ConfigError::new("boot_disk", "must be a disk id"));
            }
            Some(_) => {}
        }
        if self.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::new(
                "cmdline",
                format!("longer than {} bytes", MAX_CMDLINE_LEN - 1),
            ));
        }
        if self.cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
            return Err(ConfigError::new(
                "cmdline",
                "must be ASCII without NUL bytes",
            ));
        }
        Ok(())
    }
}

/// Where the 8250 serial port at 0x3f8 goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialConfig {
    /// The VMM's stdout; input from its stdin.
    #[default]
    Stdout,
    /// Output appended to a file; no input.
    File { path: PathBuf },
    /// A new pseudo-terminal; its path is in `vm.info`.
    Pty,
    /// A Unix socket the VMM listens on (mode 0600, or 0660 for `group`).
    /// Output goes into a ring buffer of `buffer_bytes` that every client
    /// reads at its own pace, starting with the recent output; the first
    /// client (or, when it leaves, the next one that types) writes.
    Socket {
        path: PathBuf,
        /// The ring buffer's size (default [`CONSOLE_BUFFER_DEFAULT`]); a
        /// client that falls this far behind is dropped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        buffer_bytes: Option<u64>,
        /// A host group whose members may attach (name or number).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// No serial port output.
    Off,
}

/// The console ring buffer's default size.
pub const CONSOLE_BUFFER_DEFAULT: u64 = 1 << 20;
/// The console ring buffer's smallest and largest sizes.
pub const CONSOLE_BUFFER_MIN: u64 = 4 << 10;
pub const CONSOLE_BUFFER_MAX: u64 = 64 << 20;

impl SerialConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        match self {
            SerialConfig::File { path } | SerialConfig::Socket { path, .. }
                if path.as_os_str().is_empty() =>
            {
                Err(ConfigError::new("path", "must not be empty"))
            }
            SerialConfig::Socket {
                buffer_bytes: Some(size),
                ..
            } if !(CONSOLE_BUFFER_MIN..=CONSOLE_BUFFER_MAX).contains(size) => {
                Err(ConfigError::new(
                    "buffer_bytes",
                    format!(
                        "must be between {CONSOLE_BUFFER_MIN} and {CONSOLE_BUFFER_MAX} (got {size})"
                    ),
                ))
            }
            SerialConfig::Socket {
                group: Some(group), ..
            } if group.is_empty() => Err(ConfigError::new("group", "must not be empty")),
            _ => Ok(()),
        }
    }

    /// The console ring buffer's size.
    pub fn buffer_bytes(&self) -> u64 {
        match self {
            SerialConfig::Socket {
                buffer_bytes: Some(size),
                ..
            } => *size,
            _ => CONSOLE_BUFFER_DEFAULT,
        }
    }

    /// Parses the command-line form: `stdout`, `off`, `pty`, `file=PATH`,
    /// `socket=PATH[,buffer=SIZE][,group=GROUP]`.
    pub fn parse(text: &str) -> ConfigResult<SerialConfig> {
        let bad = || {
            ConfigError::new(
                "--serial",
                format!(
                    "{text:?} is not one of stdout, off, pty, file=PATH, \
                     socket=PATH[,buffer=SIZE][,group=GROUP]"
                ),
            )
        };
        let config = match text.split_once('=') {
            None => match text {
                "stdout" => SerialConfig::Stdout,
                "off" => SerialConfig::Off,
                "pty" => SerialConfig::Pty,
                _ => return Err(bad()),
            },
            Some(("file", path)) => SerialConfig::File { path: path.into() },
            Some(("socket", spec)) => {
                let (path, options) = spec.split_once(',').unwrap_or((spec, ""));
                let mut buffer_bytes = None;
                let mut group = None;
                for (key, value) in key_values("--serial", options)? {
                    match key {
                        "buffer" => buffer_bytes = Some(parse_size("--serial buffer", value)?),
                        "group" => group = Some(value.to_string()),
                        _ => return Err(unknown_key("--serial", key)),
                    }
                }
                SerialConfig::Socket {
                    path: path.into(),
                    buffer_bytes,
                    group,
                }
            }
            Some(_) => return Err(bad()),
        };
        config.validate().map_err(|e| e.within("--serial"))?;
        Ok(config)
    }
}

/// What a guest reset does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResetAction {
    /// The VMM exits with the "reset" status, so a cluster manager sees it.
    #[default]
    Exit,
    /// The VM restarts in place from its kernel.
    Reboot,
}

/// A token bucket: sustained rate and burst size.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes per second (0 or absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    /// Requests (or frames) per second (0 or absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_per_sec: Option<u64>,
}

impl RateLimitConfig {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.unwrap_or(0) == 0 && self.ops_per_sec.unwrap_or(0) == 0
    }
}

/// A virtio-blk disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A regular file or a block device (LV, DRBD device, loop device).
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (no host page cache; the safe mode for live migration).
    #[serde(default)]
    pub direct: bool,
    /// The serial string the guest reads with GET_ID (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Logical block size reported to the guest (512 or 4096); default: the device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_block_size: Option<u32>,
    /// Physical block size reported to the guest; default: the device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

/// The virtio-blk serial field is 20 bytes.
pub const MAX_DISK_SERIAL_LEN: usize = 20;

impl DiskConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("path", "must not be empty"));
        }
        validate_id(self.id.as_deref())?;
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_DISK_SERIAL_LEN || !serial.is_ascii() {
                return Err(ConfigError::new(
                    "serial",
                    format!("must be ASCII, at most {MAX_DISK_SERIAL_LEN} bytes"),
                ));
            }
        }
        for (field, size) in [
            ("logical_block_size", self.logical_block_size),
            ("physical_block_size", self.physical_block_size),
        ] {
            if let Some(size) = size {
                if !(512..=65536).contains(&size) || !size.is_power_of_two() {
                    return Err(ConfigError::new(
                        field,
                        format!("must be a power of two from 512 to 65536 (got {size})"),
                    ));
                }
            }
        }
        if let (Some(l), Some(p)) = (self.logical_block_size, self.physical_block_size) {
            if p < l {
                return Err(ConfigError::new(
                    "physical_block_size",
                    "must not be smaller than logical_block_size",
                ));
            }
        }
        Ok(())
    }

    /// Parses the command-line form:
    /// `path=P[,id=ID][,readonly=on][,direct=on][,serial=S][,logical_block_size=N]`
    /// `[,physical_block_size=N][,rate_bytes=N][,rate_ops=N]`.
    pub fn parse(text: &str) -> ConfigResult<DiskConfig> {
        let mut disk = DiskConfig::default();
        let mut rate = RateLimitConfig::default();
        for (key, value) in key_values("--disk", text)? {
            let field = || format!("--disk {key}");
            match key {
                "path" => disk.path = value.into(),
                "id" => disk.id = Some(value.to_string()),
                "readonly" => disk.readonly = parse_bool(&field(), value)?,
                "direct" => disk.direct = parse_bool(&field(), value)?,
                "serial" => disk.serial = Some(value.to_string()),
                "logical_block_size" => {
                    disk.logical_block_size = Some(parse_number(&field(), value)?)
                }
                "physical_block_size" => {
                    disk.physical_block_size = Some(parse_number(&field(), value)?)
                }
                "rate_bytes" => rate.bytes_per_sec = Some(parse_size(&field(), value)?),
                "rate_ops" => rate.ops_per_sec = Some(parse_number(&field(), value)?),
                _ => return Err(unknown_key("--disk", key)),
            }
        }
        if !rate.is_unlimited() {
            disk.rate_limit = Some(rate);
        }
        disk.validate().map_err(|e| e.within("--disk"))?;
        Ok(disk)
    }
}

/// A virtio-net NIC on a tap device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap interface name; created if missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An already open tap file descriptor passed to the VMM (instead of `tap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The guest MAC address; default: a locally administered address from the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// A Linux bridge the tap joins (as a port, with the bridge's MTU,
    /// brought up). A host resource, like `tap`: a migration target uses
    /// its own config's bridge when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// Linux interface names are at most 15 bytes.
pub const MAX_IFNAME_LEN: usize = 15;

/// Checks a Linux interface name (tap, bridge) given in `field`.
fn validate_ifname(field: &str, name: &str) -> ConfigResult<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name.contains(['/', ' ', '\0', ':'])
    {
        return Err(ConfigError::new(
            field,
            format!("{name:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"),
        ));
    }
    Ok(())
}

impl NetConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        validate_id(self.id.as_deref())?;
        match (&self.tap, self.fd) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("fd", "give either tap or fd, not both"))
            }
            (None, None) => return Err(ConfigError::new("tap", "a tap name or an fd is required")),
            (Some(name), None) => validate_ifname("tap", name)?,
            (None, Some(fd)) => {
                if fd < 0 {
                    return Err(ConfigError::new("fd", format!("{fd} is not a valid fd")));
                }
            }
        }
        if let Some(bridge) = &self.bridge {
            validate_ifname("bridge", bridge)?;
            if self.tap.as_ref() == Some(bridge) {
                return Err(ConfigError::new(
                    "bridge",
                    format!("{bridge:?} is the tap itself"),
                ));
            }
        }
        if let Some(mac) = &self.mac {
            let bytes = parse_mac("mac", mac)?;
            if bytes[0] & 1 != 0 {
                return Err(ConfigError::new("mac", "must be a unicast address"));
            }
        }
        Ok(())
    }

    /// Parses the command-line form:
    /// `tap=NAME|fd=N[,bridge=BR][,id=ID][,mac=MAC][,rate_bytes=N][,rate_ops=N]`.
    pub fn parse(text: &str) -> ConfigResult<NetConfig> {
        let mut net = NetConfig::default();
        let mut rate = RateLimitConfig::default();
        for (key, value) in key_values("--net", text)? {
            let field = || format!("--net {key}");
            match key {
                "tap" => net.tap = Some(value.to_string()),
                "fd" => net.fd = Some(parse_number(&field(), value)?),
                "bridge" => net.bridge = Some(value.to_string()),
                "id" => net.id = Some(value.to_string()),
                "mac" => net.mac = Some(value.to_string()),
                "rate_bytes" => rate.bytes_per_sec = Some(parse_size(&field(), value)?),
                "rate_ops" => rate.ops_per_sec = Some(parse_number(&field(), value)?),
                _ => return Err(unknown_key("--net", key)),
            }
        }
        if !rate.is_unlimited() {
            net.rate_limit = Some(rate);
        }
        net.validate().map_err(|e| e.within("--net"))?;
        Ok(net)
    }
}

/// Parses `52:54:00:12:34:56`.
/// Parses `52:54:00:12:34:56`; `field` names it in the error.
pub fn parse_mac(field: &str, text: &str) -> ConfigResult<[u8; 6]> {
    let bad = || {
        ConfigError::new(
            field,
            format!("{text:?} is not a MAC address like 52:54:00:12:34:56"),
        )
    };
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// The id of the balloon device (in `vm.counters` and migration state).
pub const BALLOON_DEVICE_ID: &str = "balloon";

/// The virtio-balloon device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The initial balloon target in MiB (memory taken from the guest).
    #[serde(default)]
    pub target_mib: u64,
    /// Let the guest deflate the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Let the guest report free pages, which the host then reclaims.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// How often the guest is asked for statistics, in seconds (0: never).
    #[serde(default)]
    pub stats_interval_s: u32,
}

impl BalloonConfig {
    pub fn validate(&self) -> ConfigResult<()> {
        if self.stats_interval_s > 3600 {
            return Err(ConfigError::new(
                "stats_interval_s",
                "must be at most 3600 seconds",
            ));
        }
        Ok(())
    }

    /// Parses `[target=SIZE][,deflate_on_oom=on][,free_page_reporting=on][,stats_interval=DURATION]`
    /// (`target_mib=` and `stats_interval_s=` are the older names).
    pub fn parse(text: &str) -> ConfigResult<BalloonConfig> {
        let mut balloon = BalloonConfig {
            target_mib: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_interval_s: 0,
        };
        for (key, value) in key_values("--balloon", text)? {
            let field = || format!("--balloon {key}");
            match key {
                "target" | "target_mib" => balloon.target_mib = parse_mib(&field(), value)?,
                "deflate_on_oom" => balloon.deflate_on_oom = parse_bool(&field(), value)?,
                "free_page_reporting" => balloon.free_page_reporting = parse_bool(&field(), value)?,
                "stats_interval" | "stats_interval_s" => {
                    let interval = parse_duration(&field(), value, DurationUnit::Seconds)?;
                    if interval.subsec_millis() != 0 {
                        return Err(ConfigError::new(field(), "must be whole seconds"));
                    }
                    balloon.stats_interval_s = u32::try_from(interval.as_secs())
                        .map_err(|_| ConfigError::new(field(), "is too long"))?;
                }
                _ => return Err(unknown_key("--balloon", key)),
            }
        }
        balloon.validate().map_err(|e| e.within("--balloon"))?;
        Ok(balloon)
    }
}

impl MemoryConfig {
    /// Parses `size=128M[,backing=anonymous|memfd|hugetlbfs][,mergeable=on][,thp=on|off][,overcommit=on]`.
    /// A size without a unit is in MiB.
    pub fn parse(text: &str) -> ConfigResult<MemoryConfig> {
        let mut memory = MemoryConfig::default();
        for (key, value) in key_values("--memory", text)? {
            let field = || format!("--memory {key}");
            match key {
                "size" => memory.size_mib = parse_mib(&field(), value)?,
                "backing" => {
                    memory.backing = match value {
                        "anonymous" => MemoryBacking::Anonymous,
                        "memfd" => MemoryBacking::Memfd,
                        "hugetlbfs" => MemoryBacking::Hugetlbfs,
                        _ => {
                            return Err(ConfigError::new(
                                field(),
                                format!("{value:?} is not one of anonymous, memfd, hugetlbfs"),
                            ))
                        }
                    }
                }
                "mergeable" => memory.mergeable = parse_bool(&field(), value)?,
                "thp" => memory.thp = Some(parse_bool(&field(), value)?),
                "overcommit" => memory.overcommit = parse_bool(&field(), value)?,
                _ => return Err(unknown_key("--memory", key)),
            }
        }
        memory.validate().map_err(|e| e.within("--memory"))?;
        Ok(memory)
    }
}

/// A guest name: what names its socket (`NAME.sock`) and its log lines:
/// 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> ConfigResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "name",
            format!(
                "{name:?} is not a guest name: 1-64 characters of [A-Za-z0-9._-], not starting \
                 with '.' or '-'"
            ),
        ))
    }
}

fn validate_id(id: Option<&str>) -> ConfigResult<()> {
    if let Some(id) = id {
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(ConfigError::new(
                "id",
                format!("{id:?} must be 1-64 characters of [A-Za-z0-9._-]"),
            ));
        }
    }
    Ok(())
}

/// Splits `k=v,k=v` into pairs; a key given twice is an error.
fn key_values<'a>(option: &str, text: &'a str) -> ConfigResult<Vec<(&'a str, &'a str)>> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            ConfigError::new(option, format!("{item:?} is not of the form key=value"))
        })?;
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(ConfigError::new(option, format!("{key} is given twice")));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn unknown_key(option: &str, key: &str) -> ConfigError {
    ConfigError::new(option, format!("unknown key {key:?}"))
}

/// `on`/`off`, `true`/`false`, `yes`/`no`.
pub fn parse_bool(field: &str, value: &str) -> ConfigResult<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::new(
            field,
            format!("{value:?} is not on or off"),
        )),
    }
}

pub fn parse_number<T: std::str::FromStr>(field: &str, value: &str) -> ConfigResult<T> {
    value
        .parse()
        .map_err(|_| ConfigError::new(field, format!("{value:?} is not a valid number")))
}

/// A byte count: a whole number with an optional unit. Units are binary
/// everywhere: `K`, `M`, `G`, `T` and `Ki`, `Mi`, `Gi`, `Ti` (either case,
/// with or without a trailing `B`) are powers of 1024; no unit (or `B`)
/// is bytes. `4096`, `64K`, `512MiB`, `1Gi`, `2G`.
pub fn parse_size(field: &str, value: &str) -> ConfigResult<u64> {
    let bad = || {
        ConfigError::new(
            field,
            format!("{value:?} is not a size like 512M, 2G or 1Gi (units are powers of 1024)"),
        )
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::new(field, format!("{value:?} is too large")))
}

/// A memory size in MiB: [`parse_size`], except that a plain number is in
/// MiB (as `--memory size=` always took it); must be whole MiB.
pub fn parse_mib(field: &str, value: &str) -> ConfigResult<u64> {
    let bytes = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        parse_number::<u64>(field, value)?
            .checked_mul(1 << 20)
            .ok_or_else(|| ConfigError::new(field, format!("{value:?} is too large")))?
    } else {
        parse_size(field, value)?
    };
    if bytes % (1 << 20) != 0 {
        return Err(ConfigError::new(field, "must be a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

/// The unit of a duration given as a plain number (what the field or flag
/// took before units were accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurationUnit {
    Millis,
    Seconds,
}

/// A duration: a number (decimals allowed) with an optional unit `ms`,
/// `s`, `m` (minutes) or `h`: `500ms`, `30s`, `1.5s`, `2m`. A plain number
/// is in `plain` (the unit the field or flag always had). Precision is one
/// millisecond; at most 10 years.
pub fn parse_duration(field: &str, value: &str, plain: DurationUnit) -> ConfigResult<Duration> {
    let bad = || {
        ConfigError::new(
            field,
            format!("{value:?} is not a duration like 500ms, 30s, 2m or 1h"),
        )
    };
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let ms_per_unit: u64 = match unit {
        "" => match plain {
            DurationUnit::Millis => 1,
            DurationUnit::Seconds => 1000,
        },
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    // Whole and fractional parts, without going through a float.
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // Milliseconds of the fraction (its first 9 digits), rounded down.
    let digits = &fraction[..fraction.len().min(9)];
    let numerator: u64 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| bad())?
    };
    let fraction_ms = numerator * ms_per_unit / 10u64.pow(digits.len() as u32);
    const MAX_MS: u64 = 10 * 366 * 24 * 3_600_000;
    let ms = whole
        .checked_mul(ms_per_unit)
        .and_then(|ms| ms.checked_add(fraction_ms))
        .filter(|&ms| ms <= MAX_MS)
        .ok_or_else(|| ConfigError::new(field, format!("{value:?} is too long")))?;
    Ok(Duration::from_millis(ms))
}

impl VmConfig {
    /// Checks that a migration target configured with `self` can take a
    /// guest described by `source`: same vCPUs, memory size, devices (ids,
    /// order, what the guest sees of them). Host-local parts may differ:
    /// disk paths, tap names, memory backing, serial, KSM.
    pub fn check_migration_compatible(&self, source: &VmConfig) -> Result<(), ConfigError> {
        let differ = |field: &str, here: String, there: String| {
            Err(ConfigError::new(
                field,
                format!("{here} here, {there} on the migration source"),
            ))
        };
        if self.cpus.boot_vcpus != source.cpus.boot_vcpus {
            return differ(
                "cpus.boot_vcpus",
                self.cpus.boot_vcpus.to_string(),
                source.cpus.boot_vcpus.to_string(),
            );
        }
        if self.memory.size_mib != source.memory.size_mib {
            return differ(
                "memory.size_mib",
                self.memory.size_mib.to_string(),
                source.memory.size_mib.to_string(),
            );
        }
        let ids = |v: Vec<Option<String>>| {
            v.into_iter()
                .map(|i| i.unwrap_or_default())
                .collect::<Vec<_>>()
                .join(",")
        };
        let here_disks = ids(self.disks.iter().map(|d| d.id.clone()).collect());
        let there_disks = ids(source.disks.iter().map(|d| d.id.clone()).collect());
        if here_disks != there_disks {
            return differ(
                "disks",
                format!("[{here_disks}]"),
                format!("[{there_disks}]"),
            );
        }
        for (i, (here, there)) in self.disks.iter().zip(&source.disks).enumerate() {
            if here.readonly != there.readonly
                || here.serial != there.serial
                || here.logical_block_size != there.logical_block_size
                || here.physical_block_size != there.physical_block_size
            {
                return Err(ConfigError::new(
                    format!("disks[{i}]"),
                    "read-only, serial or block sizes differ from the migration source",
                ));
            }
        }
        let here_nets = ids(self.nets.iter().map(|n| n.id.clone()).collect());
        let there_nets = ids(source.nets.iter().map(|n| n.id.clone()).collect());
        if here_nets != there_nets {
            return differ("nets", format!("[{here_nets}]"), format!("[{there_nets}]"));
        }
        for (i, (here, there)) in self.nets.iter().zip(&source.nets).enumerate() {
            if here.mac.is_some() && here.mac != there.mac {
                return Err(ConfigError::new(
                    format!("nets[{i}].mac"),
                    "differs from the migration source (the guest keeps its MAC)",
                ));
            }
        }
        if self.balloon.is_some() != source.balloon.is_some() {
            return Err(ConfigError::new(
                "balloon",
                "present on one side of the migration only",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> VmConfig {
        VmConfig::from_json(br#"{"payload": {"kernel": "/k"}}"#).unwrap()
    }

    #[test]
    fn balloon_target_fits_the_guest_and_its_id_is_reserved() {
        let e = VmConfig::from_json(
            br#"{"payload": {"kernel": "/k"}, "memory": {"size_mib": 64},
                 "balloon": {"target_mib": 65}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "balloon.target_mib");
        VmConfig::from_json(
            br#"{"payload": {"kernel": "/k"}, "memory": {"size_mib": 64},
                 "balloon": {"target_mib": 64}}"#,
        )
        .unwrap();
        let e = VmConfig::from_json(
            br#"{"payload": {"kernel": "/k"}, "balloon": {},
                 "nets": [{"tap": "t0"}, {"tap": "t1", "id": "balloon"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "nets[1].id");
        // Without a balloon, the id is free.
        VmConfig::from_json(
            br#"{"payload": {"kernel": "/k"}, "nets": [{"tap": "t1", "id": "balloon"}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn boot_disk_names_a_disk_and_replaces_the_kernel() {
        let c = VmConfig::from_json(
            br#"{"payload": {"boot_disk": "root", "cmdline": "console=ttyS0"},
                 "disks": [{"path": "/d0"}, {"path": "/d1", "id": "root"}]}"#,
        )
        .unwrap();
        assert_eq!(c.boot_disk_index(), Some(1));
        // Default ids count too.
        let c = VmConfig::from_json(
            br#"{"payload": {"boot_disk": "disk0"}, "disks": [{"path": "/d0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.boot_disk_index(), Some(0));
        let text = serde_json::to_string(&c.payload).unwrap();
        assert!(!text.contains("kernel"), "{text}");

        let e = VmConfig::from_json(
            br#"{"payload": {"boot_disk": "root"}, "disks": [{"path": "/d0"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "payload.boot_disk");
        assert!(e.message.contains("disk0"), "{e}");
        let e = VmConfig::from_json(
            br#"{"payload": {"boot_disk": "disk0", "kernel": "/k"}, "disks": [{"path": "/d0"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "payload.boot_disk");
        let e = VmConfig::from_json(
            br#"{"payload": {"boot_disk": "disk0", "initrd": "/i"}, "disks": [{"path": "/d0"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "payload.initrd");
        let e = VmConfig::from_json(br#"{"payload": {"cmdline": "x"}}"#).unwrap_err();
        assert_eq!(e.field, "payload.kernel");
    }

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c = minimal();
        assert_eq!(c.cpus.boot_vcpus, 1);
        assert_eq!(c.memory.size_mib, 128);
        assert_eq!(c.serial, SerialConfig::Stdout);
        assert_eq!(c.on_reset, ResetAction::Exit);
    }

    #[test]
    fn json_roundtrip_keeps_everything() {
        let mut c = minimal();
        c.disks
            .push(DiskConfig::parse("path=/d,readonly=on,serial=abc,rate_ops=100").unwrap());
        c.nets
            .push(NetConfig::parse("tap=tap0,mac=52:54:00:00:00:01").unwrap());
        c.assign_device_ids();
        let text = serde_json::to_vec(&c).unwrap();
        assert_eq!(VmConfig::from_json(&text).unwrap(), c);
        assert_eq!(c.disks[0].id.as_deref(), Some("disk0"));
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = VmConfig::from_json(br#"{"payload": {"kernel": "/k"}, "memroy": {}}"#).unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
    }

    #[test]
    fn a_bridge_is_an_interface_name_other_than_the_tap() {
        let net = NetConfig::parse("tap=tap0,bridge=br0").unwrap();
        assert_eq!(net.bridge.as_deref(), Some("br0"));
        let e = NetConfig::parse("tap=tap0,bridge=tap0").unwrap_err();
        assert_eq!(e.field, "--net.bridge");
        assert!(e.to_string().contains("the tap itself"), "{e}");
        let e = NetConfig::parse("tap=tap0,bridge=a/b").unwrap_err();
        assert!(e.to_string().contains("not a valid interface name"), "{e}");
        let e = NetConfig::parse(&format!("tap=tap0,bridge={}", "b".repeat(16))).unwrap_err();
        assert_eq!(e.field, "--net.bridge");
    }

    #[test]
    fn validation_names_the_field() {
        let e = VmConfig::from_json(br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0}}"#)
            .unwrap_err();
        assert_eq!(e.field, "cpus.boot_vcpus");
        let e = DiskConfig::parse("path=/d,bogus=1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = NetConfig::parse("mac=52:54:00:00:00:01").unwrap_err();
        assert_eq!(e.field, "--net.tap");
        let e = NetConfig::parse("tap=t,mac=01:00:00:00:00:01").unwrap_err();
        assert_eq!(e.field, "--net.mac");
    }

    #[test]
    fn cpus_take_a_count_or_a_spec_with_weight_cap_and_affinity() {
        assert_eq!(
            CpusConfig::parse("2").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                ..CpusConfig::default()
            }
        );
        let c = CpusConfig::parse("boot=2,weight=300,max_percent=150,affinity=0-1,3").unwrap();
        assert_eq!(c.boot_vcpus, 2);
        assert_eq!(c.weight, Some(300));
        assert_eq!(c.max_percent, Some(150));
        assert_eq!(c.affinity.as_deref(), Some("0-1,3"));
        assert_eq!(c.affinity_cpus(), Some(vec![0, 1, 3]));
        assert!(c.wants_cgroup());
        // The CPU list may come first, and its commas stay its own.
        let c = CpusConfig::parse("affinity=2,0,weight=5").unwrap();
        assert_eq!(c.affinity_cpus(), Some(vec![0, 2]));
        assert_eq!(c.weight, Some(5));
        assert!(!CpusConfig::parse("boot=1,affinity=0")
            .unwrap()
            .wants_cgroup());

        for (spec, field) in [
            ("", "--cpus"),
            ("0", "--cpus.boot_vcpus"),
            ("weight=0", "--cpus.weight"),
            ("weight=10001", "--cpus.weight"),
            ("weight=heavy", "--cpus weight"),
            ("max_percent=0", "--cpus.max_percent"),
            ("max_percent=-5", "--cpus max_percent"),
            ("affinity=", "--cpus.affinity"),
            ("affinity=3-1", "--cpus.affinity"),
            ("affinity=0-x", "--cpus.affinity"),
            ("affinity=1024", "--cpus.affinity"),
            ("boot=2,speed=9", "--cpus"),
            ("2,weight=3", "--cpus"),
            ("weight=3,weight=4", "--cpus"),
        ] {
            let e = CpusConfig::parse(spec).unwrap_err();
            assert_eq!(e.field, field, "{spec}: {e}");
        }
        let e = VmConfig::from_json(br#"{"payload": {"kernel": "/k"}, "cpus": {"weight": 20000}}"#)
            .unwrap_err();
        assert_eq!(e.field, "cpus.weight");
        assert!(e.message.contains("between 1 and 10000"), "{e}");
        let e =
            VmConfig::from_json(br#"{"payload": {"kernel": "/k"}, "cpus": {"affinity": "0,,1"}}"#)
                .unwrap_err();
        assert_eq!(e.field, "cpus.affinity");
        // Unset fields stay out of the JSON (and out of cgroups).
        let text = serde_json::to_string(&CpusConfig::default()).unwrap();
        assert_eq!(text, r#"{"boot_vcpus":1}"#);
    }

    #[test]
    fn cpu_lists_parse_and_format_like_the_kernel() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("3,1,1-2").unwrap(), [1, 2, 3]);
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
        assert_eq!(format_cpu_list(&[]), "");
        for bad in ["", ",", "1-", "-1", "a", "1 ", "99999999999999999999999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_and_memory_parse() {
        assert_eq!(MemoryConfig::parse("size=1G").unwrap().size_mib, 1024);
        assert_eq!(MemoryConfig::parse("size=256").unwrap().size_mib, 256);
        assert!(MemoryConfig::parse("size=1").is_err());
        assert!(MemoryConfig::parse("size=100K").is_err());
        assert!(MemoryConfig::parse("size=99999999999999999999").is_err());
        assert!(MemoryConfig::parse("size=64M,backing=memfd,mergeable=on").is_err());
        assert_eq!(parse_size("x", "64K").unwrap(), 65536);
    }

    #[test]
    fn sizes_are_binary_in_every_spelling() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("512B", 512),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("512M", 512 << 20),
            ("512Mi", 512 << 20),
            ("512MB", 512 << 20),
            ("2G", 2 << 30),
            ("1Gi", 1 << 30),
            ("1gib", 1 << 30),
            ("3T", 3 << 40),
            ("1Ti", 1 << 40),
        ] {
            assert_eq!(parse_size("f", text).unwrap(), bytes, "{text}");
        }
        for bad in [
            "",
            "M",
            "1.5M",
            "-1",
            "10X",
            "10 M",
            "1i",
            "1iB",
            "G1",
            "99999999999T",
        ] {
            let e = parse_size("--f", bad).unwrap_err();
            assert_eq!(e.field, "--f", "{bad}");
        }
        // The memory spec keeps MiB for a plain number.
        assert_eq!(MemoryConfig::parse("size=2Gi").unwrap().size_mib, 2048);
        assert_eq!(MemoryConfig::parse("size=512MiB").unwrap().size_mib, 512);
    }

    #[test]
    fn balloon_spec_takes_sizes_and_durations_under_old_and_new_keys() {
        let b = BalloonConfig::parse("target=1G,stats_interval=2m").unwrap();
        assert_eq!((b.target_mib, b.stats_interval_s), (1024, 120));
        let b = BalloonConfig::parse("target_mib=256,stats_interval_s=5").unwrap();
        assert_eq!((b.target_mib, b.stats_interval_s), (256, 5));
        assert!(BalloonConfig::parse("stats_interval=1500ms").is_err());
        assert!(BalloonConfig::parse("target=1000K").is_err());
    }

    #[test]
    fn guest_names_are_checked() {
        for good in ["web1", "db.prod-2", "A_b"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        let e =
            VmConfig::from_json(br#"{"name": "../x", "payload": {"kernel": "/k"}}"#).unwrap_err();
        assert_eq!(e.field, "name");
    }

    #[test]
    fn durations_take_units_and_keep_the_plain_unit() {
        let ms = |text: &str, plain| parse_duration("f", text, plain).map(|d| d.as_millis());
        assert_eq!(ms("500ms", DurationUnit::Seconds), Ok(500));
        assert_eq!(ms("30s", DurationUnit::Millis), Ok(30_000));
        assert_eq!(ms("2m", DurationUnit::Millis), Ok(120_000));
        assert_eq!(ms("1h", DurationUnit::Seconds), Ok(3_600_000));
        assert_eq!(ms("1.5s", DurationUnit::Millis), Ok(1500));
        assert_eq!(ms(".25s", DurationUnit::Millis), Ok(250));
        assert_eq!(ms("0.5", DurationUnit::Seconds), Ok(500));
        assert_eq!(ms("300", DurationUnit::Millis), Ok(300));
        assert_eq!(ms("300", DurationUnit::Seconds), Ok(300_000));
        for bad in [
            "",
            "s",
            ".",
            "1.2.3s",
            "-1s",
            "10x",
            "10 s",
            "1e3",
            "99999999999h",
        ] {
            let e = parse_duration("--f", bad, DurationUnit::Seconds).unwrap_err();
            assert_eq!(e.field, "--f", "{bad}");
        }
    }

    #[test]
    fn transparent_huge_pages_default_and_override() {
        let config = |memory: &str, balloon: bool| VmConfig {
            memory: MemoryConfig::parse(memory).unwrap(),
            balloon: balloon.then(BalloonConfig::default),
            ..Default::default()
        };
        assert!(config("size=1G", false).transparent_huge_pages());
        assert!(!config("size=1G", true).transparent_huge_pages());
        assert!(!config("size=1G,mergeable=on", false).transparent_huge_pages());
        assert!(!config("size=1G,backing=memfd", false).transparent_huge_pages());
        assert!(!config("size=1G,thp=off", false).transparent_huge_pages());
        assert!(config("size=1G,thp=on", true).transparent_huge_pages());
        let e = MemoryConfig::parse("size=64M,backing=hugetlbfs,thp=on").unwrap_err();
        assert_eq!(e.field, "--memory.thp");
        assert!(MemoryConfig::parse("size=64M,thp=maybe").is_err());
        // Unset stays unset in JSON, so a migrated config keeps the default rule.
        let json = serde_json::to_string(&MemoryConfig::default()).unwrap();
        assert!(!json.contains("thp"), "{json}");
    }

    #[test]
    fn a_balloon_needs_memory_it_can_give_back() {
        let e = VmConfig::from_json(
            br#"{"payload": {"kernel": "/k"}, "memory": {"size_mib": 64, "backing": "hugetlbfs"}, "balloon": {}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "balloon");
        assert!(e.message.contains("hugetlbfs"), "{e}");
    }

    #[test]
    fn serial_forms_parse() {
        assert_eq!(SerialConfig::parse("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            SerialConfig::parse("socket=/tmp/s").unwrap(),
            SerialConfig::Socket {
                path: "/tmp/s".into(),
                buffer_bytes: None,
                group: None,
            }
        );
        assert_eq!(
            SerialConfig::parse("socket=/tmp/s,buffer=64K,group=vmm-ops").unwrap(),
            SerialConfig::Socket {
                path: "/tmp/s".into(),
                buffer_bytes: Some(64 << 10),
                group: Some("vmm-ops".into()),
            }
        );
        let e = SerialConfig::parse("socket=/tmp/s,buffer=1").unwrap_err();
        assert_eq!(e.field, "--serial.buffer_bytes");
        assert!(SerialConfig::parse("socket=/tmp/s,mode=x").is_err());
        assert!(SerialConfig::parse("file=").is_err());
        assert!(SerialConfig::parse("tty").is_err());
    }
}

/// Whose fault an error is, which decides how it is reported: the HTTP
/// status of an API reply and the exit code of a `vmm` that cannot start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The caller asked for something wrong (a bad field, a missing file):
    /// 400, exit code 2.
    Caller,
    /// Something else holds what the VM needs (a disk locked by another
    /// VMM) or the VM is in the wrong state: 409, exit code 1.
    Conflict,
    /// The host failed (KVM, memory, an I/O error): 500, exit code 1.
    Host,
}

impl ErrorClass {
    /// The class of an I/O error on something the caller named (a disk
    /// path, a tap name): missing or forbidden is theirs, anything else the host's.
    pub fn of_io(error: &std::io::Error) -> ErrorClass {
        use std::io::ErrorKind::*;
        match error.kind() {
            NotFound | PermissionDenied | InvalidInput | AlreadyExists | IsADirectory
            | NotADirectory | ReadOnlyFilesystem => ErrorClass::Caller,
            _ => ErrorClass::Host,
        }
    }
}

/// `text` with every control character (C0, DEL, C1: newlines, ANSI
/// escape sequences) and every Unicode bidirectional override written as
/// an escape (`\n`, `\x1b`, `\u{202e}`), so text from an untrusted source
/// (a migration peer) stays one visible line in a log or on a terminal.
pub fn escape_control(text: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod escape_tests {
    use super::escape_control;

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped() {
        assert_eq!(escape_control("plain text, é"), "plain text, é");
        assert_eq!(
            escape_control("a\nvmm: forged\x1b[31mred\x07\u{9b}\u{202e}x\r\t"),
            "a\\nvmm: forged\\x1b[31mred\\x07\\x9b\\u{202e}x\\r\\t"
        );
    }
}
