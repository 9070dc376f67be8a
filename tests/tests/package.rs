//! The Debian package (resources/package.sh) installs on this machine and
//! works from where it puts things: `vmm --version`, `ocf-tester` against
//! the installed agent (whose default binaries are the package's), `man -w
//! vmmctl`, `systemd-analyze verify` of an instance of the installed guest
//! unit (man pages included); purging it removes all of it, and the host is
//! left as it was (a file the package would cover — the cluster tests
//! install the agent at the same path — is saved and put back).
//!
//! The package is built from the debug binaries `cargo test --workspace`
//! built, so the test costs no release build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmm_tests::harness::{testguest, workspace_binary, TempDir};
use vmm_tests::require_kvm;

const PACKAGE: &str = "rustvmm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(command: &mut Command) -> String {
    let out = run(command);
    assert!(out.status.success(), "{command:?}: {}", text(&out));
    text(&out)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the host had at the package's paths, put back on drop (after the
/// package is purged).
struct HostFiles {
    saved: BTreeMap<PathBuf, (Vec<u8>, u32)>,
}

impl HostFiles {
    /// Saves the regular files at the paths `deb` would install.
    fn save(deb: &Path) -> HostFiles {
        use std::os::unix::fs::PermissionsExt;
        let out = run(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -t",
            deb.display()
        )));
        assert!(out.status.success(), "{}", text(&out));
        let mut saved = BTreeMap::new();
        for entry in String::from_utf8_lossy(&out.stdout).lines() {
            let path = PathBuf::from(entry.trim_start_matches('.'));
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.is_file() {
                    let bytes = std::fs::read(&path).unwrap();
                    saved.insert(path, (bytes, meta.permissions().mode()));
                }
            }
        }
        HostFiles { saved }
    }
}

impl Drop for HostFiles {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
        for (path, (bytes, mode)) in &self.saved {
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(path, bytes);
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode));
        }
    }
}

#[test]
fn the_package_installs_works_where_it_puts_things_and_purges_cleanly() {
    require_kvm!();
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: installing a package needs root");
        return;
    }
    for tool in [
        "dpkg-deb",
        "ocf-tester",
        "man",
        "jq",
        "help2man",
        "systemd-analyze",
    ] {
        if !have(tool) {
            eprintln!("SKIP: {tool} is not installed (resources/test.sh installs it)");
            return;
        }
    }
    // Built by `cargo test --workspace`; its absence is a failure.
    workspace_binary("vmm-web");
    let dir = TempDir::new("package");
    let built = run_ok(
        Command::new("sh")
            .arg(repo().join("resources/package.sh"))
            .args(["--profile", "debug", "--no-build", "--out"])
            .arg(dir.path()),
    );
    let deb = PathBuf::from(built.lines().last().unwrap().trim());
    assert!(deb.is_file(), "{built}");
    // A package left by an earlier run that died goes first.
    let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    let host = HostFiles::save(&deb);

    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    let version = run_ok(Command::new("/usr/bin/vmm").arg("--version"));
    assert!(
        version.starts_with(&format!("vmm {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let page = run_ok(Command::new("man").args(["-w", "vmmctl"]));
    assert!(page.trim().ends_with("/man1/vmmctl.1.gz"), "{page}");
    // The installed guest template, with the package's binaries and man pages.
    let verify = run_ok(Command::new("systemd-analyze").args(["verify", "vmm@pkgtest.service"]));
    assert!(verify.trim().is_empty(), "{verify}");

    // ocf-tester against the installed agent, which finds the package's
    // vmm and vmmctl by default.
    let agent = "/usr/lib/ocf/resource.d/rustvmm/vmm";
    let agent_text = std::fs::read_to_string(agent).unwrap();
    assert!(
        agent_text.contains("vmm_binary_default=\"/usr/bin/vmm\""),
        "the packaged agent's default vmm"
    );
    let config = dir.join("pkgtest.json");
    let json = serde_json::json!({
        "memory": {"size_mib": 64},
        "payload": {
            "kernel": testguest().display().to_string(),
            "cmdline": "-- counters period_ms=1000",
        },
    });
    std::fs::write(&config, serde_json::to_vec(&json).unwrap()).unwrap();
    let tester = run(Command::new("ocf-tester")
        .args(["-n", "pkgtest"])
        .arg("-o")
        .arg(format!("config={}", config.display()))
        .arg("-o")
        .arg(format!("socket_dir={}", dir.join("run").display()))
        .arg("-o")
        .arg(format!("log_file={}", dir.join("pkgtest.log").display()))
        .arg(agent)
        .env("OCF_ROOT", "/usr/lib/ocf"));
    assert!(
        tester.status.success(),
        "ocf-tester:\n{}\n--- log ---\n{}",
        text(&tester),
        std::fs::read_to_string(dir.join("pkgtest.log")).unwrap_or_default()
    );

    // Every example config is one the VMM accepts.
    let examples = Path::new("/usr/share/doc/rustvmm/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            config::VmConfig::from_json(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 2, "{checked} example configs");

    // Purged: nothing of it is left.
    run_ok(Command::new("dpkg").args(["--purge", PACKAGE]));
    for path in [
        "/usr/bin/vmm",
        "/usr/bin/vmmctl",
        "/lib/systemd/system/vmm@.service",
    ] {
        assert!(!Path::new(path).exists(), "{path} outlived the purge");
    }
    let status = run(Command::new("dpkg").args(["-s", PACKAGE]));
    assert!(
        !status.status.success(),
        "still installed: {}",
        text(&status)
    );
    drop(host);
}
