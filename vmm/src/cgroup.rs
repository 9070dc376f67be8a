//! The VMM's own CPU cgroup: `cpus.weight` and `cpus.max_percent`.
//!
//! A guest that sets either gets a cgroup of its own, `PARENT/vm-NAME`
//! (`--cgroup-parent`, default `vmm.slice`; NAME is the guest's name, or
//! `pid-PID` without one), and the whole VMM process moves into it before
//! its guest runs: cgroup v2 (`cpu.weight`, `cpu.max`) where the unified
//! hierarchy offers the `cpu` controller, else cgroup v1's `cpu` hierarchy
//! (`cpu.shares` = weight × 1024 / 100, `cpu.cfs_quota_us` per
//! `cpu.cfs_period_us`). At exit the VMM moves back to the cgroup it came
//! from (cgroup v2 forbids processes in a parent that hands controllers
//! to its children, so not into PARENT) and removes its directory. A
//! directory left by a VMM of the same name that was killed is reused
//! when it is empty; one that holds processes (the source of a migration
//! on this host) is left alone and this VMM takes `vm-NAME@PID`.
//!
//! The paths are computed from a root that is a parameter, so the logic is
//! tested here against a fake sysfs tree.

use std::io;
use std::path::{Path, PathBuf};

use config::{CpusConfig, ErrorClass, CPU_WEIGHT_DEFAULT};

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The default parent of the VMMs' cgroups.
pub const DEFAULT_PARENT: &str = "vmm.slice";
/// The CFS period the cap is expressed in (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cpus.weight and cpus.max_percent need the cgroup cpu controller, which this host \
         offers neither in cgroup v2 ({root}/cgroup.controllers) nor in cgroup v1 ({root}/cpu)"
    )]
    NoCpuController { root: String },
    #[error(
        "cannot set up the VMM's cgroup for cpus.weight or cpus.max_percent ({path}): no \
         privileges after --user (give the VM on the command line, which sets it up before \
         the VMM drops root)"
    )]
    Unprivileged { path: String },
    #[error(
        "{parent:?} is not a cgroup path relative to the hierarchy's root (like vmm.slice \
         or machine.slice/vmm)"
    )]
    BadParent { parent: String },
    #[error("cannot find this process's cgroup in /proc/self/cgroup")]
    NoOwnCgroup,
    #[error("cgroup {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl CgroupError {
    pub fn class(&self) -> ErrorClass {
        match self {
            CgroupError::BadParent { .. } => ErrorClass::Caller,
            _ => ErrorClass::Host,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Which cgroup interface holds the cpu controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The hierarchy with the cpu controller under `root` (`/sys/fs/cgroup`):
/// the unified one if its root offers `cpu`, else the v1 `cpu` hierarchy.
pub fn cpu_hierarchy(root: &Path) -> Result<(Version, PathBuf), CgroupError> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "cpu") {
        return Ok((Version::V2, root.to_path_buf()));
    }
    // `cpu` is a directory or a link to `cpu,cpuacct`.
    let v1 = root.join("cpu");
    if v1.join("cpu.shares").exists() {
        return Ok((Version::V1, v1));
    }
    Err(CgroupError::NoCpuController {
        root: root.display().to_string(),
    })
}

/// This process's cgroup in the hierarchy of `version`, from the text of
/// `/proc/self/cgroup` (`0::/path` for v2, `N:cpu,cpuacct:/path` for v1).
pub fn own_cgroup(proc_self_cgroup: &str, version: Version) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
        };
        ours.then(|| path.to_string())
    })
}

/// The files that give a cgroup `cpus`' weight and cap, in the order to
/// write them (v1: the period before the quota it is checked against).
pub fn settings(version: Version, cpus: &CpusConfig) -> Vec<(&'static str, String)> {
    let weight = cpus.weight.unwrap_or(CPU_WEIGHT_DEFAULT);
    let quota = cpus
        .max_percent
        .map(|percent| u64::from(percent) * PERIOD_US / 100);
    match version {
        Version::V2 => vec![
            ("cpu.weight", weight.to_string()),
            (
                "cpu.max",
                match quota {
                    Some(quota) => format!("{quota} {PERIOD_US}"),
                    None => format!("max {PERIOD_US}"),
                },
            ),
        ],
        Version::V1 => vec![
            ("cpu.shares", (u64::from(weight) * 1024 / 100).to_string()),
            ("cpu.cfs_period_us", PERIOD_US.to_string()),
            (
                "cpu.cfs_quota_us",
                quota.map_or("-1".to_string(), |q| q.to_string()),
            ),
        ],
    }
}

/// Checks `--cgroup-parent`: a relative path of plain names.
pub fn validate_parent(parent: &str) -> Result<(), CgroupError> {
    let ok = !parent.is_empty()
        && !parent.starts_with('/')
        && parent.split('/').all(|c| {
            !c.is_empty() && c != "." && c != ".." && !c.bytes().any(|b| b.is_ascii_control())
        });
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadParent {
            parent: parent.to_string(),
        })
    }
}

/// The process ids in a cgroup (its `cgroup.procs`).
fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes `vm-NAME@PID` directories without processes: what VMMs of
/// this name that ran beside another one (a migration target on the same
/// host) left when they could not remove them (killed, or `--user`).
fn remove_stale_siblings(parent: &Path, name: &str) {
    let prefix = format!("vm-{name}@");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry.file_name().to_str().is_some_and(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        }) && procs(&path).is_ok_and(|p| p.is_empty());
        if stale && std::fs::remove_dir(&path).is_ok() {
            log::info!(
                "cgroup: removed {}, left by an earlier VMM of this name",
                path.display()
            );
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_error(path))
}

/// The VMM's cgroup while it is in it; leaving it (drop) moves the VMM
/// back and removes the directory.
#[derive(Debug)]
pub struct CpuCgroup {
    version: Version,
    /// The VMM's own directory.
    dir: PathBuf,
    /// The directory of the cgroup the VMM came from.
    home: PathBuf,
    pid: u32,
    /// Whether the VMM moved into `dir` (and must move back).
    joined: bool,
}

impl CpuCgroup {
    /// Creates (or reuses) `PARENT/vm-NAME` under the cpu hierarchy of
    /// `root`, gives it `cpus`' settings and moves process `pid`, whose
    /// `/proc/PID/cgroup` reads `proc_cgroup`, into it.
    pub fn enter(
        root: &Path,
        parent: &str,
        name: &str,
        cpus: &CpusConfig,
        pid: u32,
        proc_cgroup: &str,
    ) -> Result<CpuCgroup, CgroupError> {
        let (version, hierarchy) = cpu_hierarchy(root)?;
        let own = own_cgroup(proc_cgroup, version).ok_or(CgroupError::NoOwnCgroup)?;
        let home = hierarchy.join(own.trim_start_matches('/'));
        let parent_dir = hierarchy.join(parent);
        if version == Version::V2 {
            // Each level down to the parent hands the cpu controller on.
            let mut level = hierarchy.clone();
            write(&level.join("cgroup.subtree_control"), "+cpu")?;
            for part in parent.split('/') {
                level.push(part);
                match std::fs::create_dir(&level) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(io_error(&level)(e))
                    }
                    _ => {}
                }
                write(&level.join("cgroup.subtree_control"), "+cpu")?;
            }
        } else {
            std::fs::create_dir_all(&parent_dir).map_err(io_error(&parent_dir))?;
        }
        remove_stale_siblings(&parent_dir, name);
        let mut dir = parent_dir.join(format!("vm-{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let holders = procs(&dir)?;
                if holders.is_empty() {
                    log::info!(
                        "cgroup: reusing {}, left by an earlier VMM of this name",
                        dir.display()
                    );
                } else {
                    // Another VMM of this name (a migration source on this
                    // host): not to be shared, nor touched. `@` is not in
                    // guest names, so this cannot be another guest's.
                    let other = parent_dir.join(format!("vm-{name}@{pid}"));
                    log::info!(
                        "cgroup: {} holds process {} (another VMM of this name): using {}",
                        dir.display(),
                        holders[0],
                        other.display()
                    );
                    dir = other;
                    match std::fs::create_dir(&dir) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            return Err(io_error(&dir)(e))
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => return Err(io_error(&dir)(e)),
        }
        let mut cgroup = CpuCgroup {
            version,
            dir,
            home,
            pid,
            joined: false,
        };
        // On an error from here on, drop removes the directory again.
        cgroup.apply(cpus)?;
        write(&cgroup.dir.join("cgroup.procs"), &pid.to_string())?;
        cgroup.joined = true;
        log::info!(
            "cgroup: in {} (cgroup {}): {}",
            cgroup.dir.display(),
            match version {
                Version::V1 => "v1",
                Version::V2 => "v2",
            },
            cgroup.describe(cpus)
        );
        Ok(cgroup)
    }

    /// [`CpuCgroup::enter`] for this process, under [`CGROUP_ROOT`].
    pub fn enter_own(
        parent: &str,
        name: &str,
        cpus: &CpusConfig,
    ) -> Result<CpuCgroup, CgroupError> {
        let path = "/proc/self/cgroup";
        let proc_cgroup =
            crate::memory::read_proc_self("cgroup").map_err(io_error(Path::new(path)))?;
        CpuCgroup::enter(
            Path::new(CGROUP_ROOT),
            parent,
            name,
            cpus,
            std::process::id(),
            &proc_cgroup,
        )
        .map_err(|e| {
            // SAFETY: geteuid has no arguments and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            match e {
                CgroupError::Io { path, source }
                    if source.kind() == io::ErrorKind::PermissionDenied && !root =>
                {
                    CgroupError::Unprivileged { path }
                }
                e => e,
            }
        })
    }

    /// Gives the cgroup `cpus`' weight and cap (a VM defined again with
    /// another config).
    pub fn apply(&self, cpus: &CpusConfig) -> Result<(), CgroupError> {
        for (file, value) in settings(self.version, cpus) {
            write(&self.dir.join(file), &value)?;
        }
        Ok(())
    }

    /// The settings as a log line shows them.
    fn describe(&self, cpus: &CpusConfig) -> String {
        settings(self.version, cpus)
            .iter()
            .map(|(file, value)| format!("{file} {value}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the VMM back home and removes the directory.
    fn leave(&mut self) -> Result<(), CgroupError> {
        if self.joined {
            write(&self.home.join("cgroup.procs"), &self.pid.to_string())?;
            self.joined = false;
        }
        // The kernel may take a moment to see the cgroup empty.
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => return Err(io_error(&self.dir)(e)),
            }
        }
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        match self.leave() {
            Ok(()) => log::info!("cgroup: left and removed {}", self.dir.display()),
            // After --user the VMM may not write the root's cgroups.
            Err(CgroupError::Io { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                log::info!(
                    "cgroup: {} stays (this VMM gave up the privileges to remove it with \
                     --user); the next VMM of this name reuses it",
                    self.dir.display()
                )
            }
            Err(e) => log::warn!(
                "cgroup: {e}; {} stays until a VMM of the same name starts again",
                self.dir.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            let path =
                std::env::temp_dir().join(format!("vmm-cgroup-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Tree(path)
        }

        fn read(&self, path: &str) -> String {
            std::fs::read_to_string(self.0.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        }

        /// What cgroupfs does on rmdir of a cgroup without processes: the
        /// control files go with it (a fake tree needs them removed).
        fn empty(&self, dir: &Path) {
            for entry in std::fs::read_dir(dir).unwrap() {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cpus(weight: Option<u32>, max_percent: Option<u32>) -> CpusConfig {
        CpusConfig {
            weight,
            max_percent,
            ..CpusConfig::default()
        }
    }

    #[test]
    fn v2_is_chosen_where_the_unified_root_offers_cpu_and_gets_weight_and_max() {
        let tree = Tree::new("v2");
        let root = &tree.0;
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("system.slice/vmm@web1.service")).unwrap();
        let proc_cgroup = "0::/system.slice/vmm@web1.service\n";
        let cgroup = CpuCgroup::enter(
            root,
            "machine.slice/vmm",
            "web1",
            &cpus(Some(300), Some(150)),
            4242,
            proc_cgroup,
        )
        .unwrap();
        let dir = root.join("machine.slice/vmm/vm-web1");
        assert_eq!(cgroup.dir(), dir);
        // Every level down to the parent hands the controller on.
        for level in ["", "machine.slice/", "machine.slice/vmm/"] {
            assert_eq!(tree.read(&format!("{level}cgroup.subtree_control")), "+cpu");
        }
        assert_eq!(tree.read("machine.slice/vmm/vm-web1/cpu.weight"), "300");
        assert_eq!(
            tree.read("machine.slice/vmm/vm-web1/cpu.max"),
            "150000 100000"
        );
        assert_eq!(tree.read("machine.slice/vmm/vm-web1/cgroup.procs"), "4242");
        assert!(!dir.join("cpu.shares").exists());

        tree.empty(&dir);
        drop(cgroup);
        // Back where it came from (not the parent, which v2 forbids), and gone.
        assert_eq!(
            tree.read("system.slice/vmm@web1.service/cgroup.procs"),
            "4242"
        );
        assert!(!dir.exists());
        assert!(root.join("machine.slice/vmm").exists());
    }

    #[test]
    fn v1_cpu_hierarchy_gets_shares_and_quota_when_v2_lacks_cpu() {
        let tree = Tree::new("v1");
        let root = &tree.0;
        // A hybrid host (like this one): unified without cpu, v1 cpu.
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
        std::fs::create_dir_all(root.join("cpu")).unwrap();
        std::fs::write(root.join("cpu/cpu.shares"), "1024").unwrap();
        let proc_cgroup = "9:name=systemd:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        let cgroup = CpuCgroup::enter(
            root,
            "vmm.slice",
            "db",
            &cpus(Some(300), None),
            7,
            proc_cgroup,
        )
        .unwrap();
        let dir = root.join("cpu/vmm.slice/vm-db");
        assert_eq!(cgroup.dir(), dir);
        assert_eq!(tree.read("cpu/vmm.slice/vm-db/cpu.shares"), "3072");
        assert_eq!(tree.read("cpu/vmm.slice/vm-db/cpu.cfs_period_us"), "100000");
        assert_eq!(tree.read("cpu/vmm.slice/vm-db/cpu.cfs_quota_us"), "-1");
        assert_eq!(tree.read("cpu/vmm.slice/vm-db/cgroup.procs"), "7");
        // Another config for the next VM of this VMM.
        cgroup.apply(&cpus(None, Some(20))).unwrap();
        assert_eq!(tree.read("cpu/vmm.slice/vm-db/cpu.shares"), "1024");
        assert_eq!(tree.read("cpu/vmm.slice/vm-db/cpu.cfs_quota_us"), "20000");
        tree.empty(&dir);
        drop(cgroup);
        assert_eq!(tree.read("cpu/cgroup.procs"), "7");
        assert!(!dir.exists());
    }

    #[test]
    fn a_stale_directory_is_reused_and_a_busy_one_left_to_its_owner() {
        let tree = Tree::new("stale");
        let root = &tree.0;
        std::fs::create_dir_all(root.join("cpu/vmm.slice/vm-web1")).unwrap();
        std::fs::write(root.join("cpu/cpu.shares"), "1024").unwrap();
        // Killed VMM: its directory is empty of processes.
        std::fs::write(root.join("cpu/vmm.slice/vm-web1/cgroup.procs"), "").unwrap();
        let proc_cgroup = "1:cpu,cpuacct:/\n";
        let a = CpuCgroup::enter(
            root,
            "vmm.slice",
            "web1",
            &cpus(Some(50), None),
            11,
            proc_cgroup,
        )
        .unwrap();
        assert_eq!(a.dir(), root.join("cpu/vmm.slice/vm-web1"));
        // A second VMM of the same name while the first runs.
        let b = CpuCgroup::enter(
            root,
            "vmm.slice",
            "web1",
            &cpus(Some(50), None),
            12,
            proc_cgroup,
        )
        .unwrap();
        assert_eq!(b.dir(), root.join("cpu/vmm.slice/vm-web1@12"));
        assert_eq!(tree.read("cpu/vmm.slice/vm-web1/cgroup.procs"), "11");
        assert_eq!(tree.read("cpu/vmm.slice/vm-web1@12/cpu.shares"), "512");
    }

    #[test]
    fn no_cpu_controller_and_bad_parents_are_refused() {
        let tree = Tree::new("none");
        let e = CpuCgroup::enter(&tree.0, "vmm.slice", "x", &cpus(Some(1), None), 1, "0::/")
            .unwrap_err();
        assert!(matches!(e, CgroupError::NoCpuController { .. }), "{e}");
        assert!(e.to_string().contains("cpus.weight"), "{e}");
        for bad in ["", "/vmm.slice", "a/../b", "a//b", "./a"] {
            assert!(validate_parent(bad).is_err(), "{bad:?}");
        }
        validate_parent("machine.slice/vmm").unwrap();
    }

    #[test]
    fn own_cgroup_reads_either_format() {
        let text = "12:cpu,cpuacct:/a/b\n0::/c\n";
        assert_eq!(own_cgroup(text, Version::V1).as_deref(), Some("/a/b"));
        assert_eq!(own_cgroup(text, Version::V2).as_deref(), Some("/c"));
        assert_eq!(own_cgroup("3:cpuset:/x\n", Version::V1), None);
    }

    #[test]
    fn settings_map_weight_and_percent_to_each_version() {
        let c = cpus(Some(10_000), Some(250));
        assert_eq!(
            settings(Version::V2, &c),
            [
                ("cpu.weight", "10000".to_string()),
                ("cpu.max", "250000 100000".to_string())
            ]
        );
        assert_eq!(
            settings(Version::V1, &c),
            [
                ("cpu.shares", "102400".to_string()),
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "250000".to_string())
            ]
        );
        // The smallest weight still gives v1 more than its minimum of 2.
        assert_eq!(settings(Version::V1, &cpus(Some(1), None))[0].1, "10");
    }
}
