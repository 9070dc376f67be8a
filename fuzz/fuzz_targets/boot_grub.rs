//! GRUB's files as the guest wrote them: grub.cfg (menu entries,
//! submenus, `set default`), grubenv, /etc/default/grub assignments, and
//! the Debian version order used to pick the newest kernel. Nothing may
//! panic; the version order is a total order (reflexive, antisymmetric, transitive).
#![no_main]

use std::cmp::Ordering;
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use vmm::boot::grub::{apply_shell_assignments, compare_versions, grubenv_value, parse_grub_cfg};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{0}');
    let cfg = parts.next().unwrap_or("");
    let env = parts.next().unwrap_or("");
    let saved = grubenv_value(env, "saved_entry");
    let _ = parse_grub_cfg(cfg, saved);
    let mut vars = BTreeMap::new();
    apply_shell_assignments(env, &mut vars);
    let versions: Vec<&str> = parts.next().unwrap_or("").split('\n').take(3).collect();
    for a in &versions {
        assert_eq!(compare_versions(a, a), Ordering::Equal);
        for b in &versions {
            let ab = compare_versions(a, b);
            assert_eq!(ab, compare_versions(b, a).reverse(), "{a:?} vs {b:?}");
            for c in &versions {
                if ab != Ordering::Greater && compare_versions(b, c) != Ordering::Greater {
                    assert_ne!(
                        compare_versions(a, c),
                        Ordering::Greater,
                        "{a:?} {b:?} {c:?}"
                    );
                }
            }
        }
    }
});
