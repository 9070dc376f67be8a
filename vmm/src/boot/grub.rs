//! The small text formats a Debian guest's boot settings are kept in, read
//! from its (hostile) disk: GRUB's `grub.cfg` (menu entries and the default
//! one), `grubenv`, the shell assignments of `/etc/default/grub`, and the
//! Debian ordering of kernel versions. Each parser is line based, bounded
//! by its input (which the caller caps) and by the limits below, and never
//! fails: what it cannot read it leaves out.

use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Deepest nesting of `{ }` blocks followed in grub.cfg.
const MAX_DEPTH: usize = 16;
/// Menu entries and submenus kept from grub.cfg.
const MAX_ITEMS: usize = 4096;
/// Words taken from one line.
const MAX_WORDS: usize = 256;
/// Variables kept from /etc/default/grub.
const MAX_VARS: usize = 256;
/// Longest value kept for one variable (a kernel command line is shorter).
const MAX_VALUE: usize = 4096;

/// One `menuentry`: its title, id and the words of its `linux` and
/// `initrd` lines (path first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MenuEntry {
    pub title: String,
    pub id: Option<String>,
    pub linux: Vec<String>,
    pub initrd: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MenuItem {
    Entry(MenuEntry),
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<MenuItem>,
    },
}

/// What grub.cfg boots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrubConfig {
    pub items: Vec<MenuItem>,
    /// The last `set default=` with a value known without running GRUB
    /// (a literal, or `${saved_entry}` from grubenv).
    pub default: Option<String>,
}

/// Splits a shell-like line into words: `'...'` literal, `"..."` with `\`
/// escapes, `\` escaping one character, `#` starting a comment at a word's
/// start. `$NAME` and `${NAME}` outside single quotes are replaced by
/// `expand` when given, else kept as they are.
pub fn words(line: &str, expand: Option<&dyn Fn(&str) -> String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return out,
            _ => {}
        }
        if out.len() == MAX_WORDS {
            return out;
        }
        let mut word = String::new();
        let mut quote = None;
        while let Some(&c) = chars.peek() {
            if quote.is_none() && c.is_whitespace() {
                break;
            }
            chars.next();
            match (quote, c) {
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (Some('\''), c) => word.push(c),
                (_, '\\') => {
                    if let Some(next) = chars.next() {
                        // In double quotes only these are escapes.
                        if quote.is_some() && !matches!(next, '"' | '\\' | '$') {
                            word.push('\\');
                        }
                        word.push(next);
                    }
                }
                (_, '$') if expand.is_some() => {
                    let braced = chars.peek() == Some(&'{');
                    if braced {
                        chars.next();
                    }
                    let mut name = String::new();
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '_' {
                            name.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    if braced && chars.peek() == Some(&'}') {
                        chars.next();
                    }
                    if name.is_empty() {
                        word.push('$');
                    } else if let Some(expand) = expand {
                        word.push_str(&expand(&name));
                    }
                }
                (_, c) => word.push(c),
            }
            if word.len() > MAX_VALUE {
                break;
            }
        }
        out.push(word);
    }
}

/// The id of a `menuentry`/`submenu` line: after `--id` or
/// `$menuentry_id_option`.
fn item_id(words: &[String]) -> Option<String> {
    let at = words
        .iter()
        .position(|w| w == "--id" || w == "$menuentry_id_option")?;
    words.get(at + 1).cloned()
}

enum Frame {
    Entry(MenuEntry),
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<MenuItem>,
    },
    /// `function`, or any other braced block: passed through.
    Other,
}

/// Reads the menu of a grub.cfg. `saved_entry` is grubenv's, for
/// `set default="${saved_entry}"` (GRUB_DEFAULT=saved).
pub fn parse_grub_cfg(text: &str, saved_entry: Option<&str>) -> GrubConfig {
    let mut top: Vec<MenuItem> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut default = None;
    let mut items = 0usize;
    // Blocks opened past MAX_DEPTH (or MAX_ITEMS): counted, not read.
    let mut skipped = 0usize;
    for line in text.lines() {
        let w = words(line, None);
        let Some(first) = w.first() else { continue };
        if first == "}" {
            if skipped > 0 {
                skipped -= 1;
                continue;
            }
            let item = match stack.pop() {
                Some(Frame::Entry(entry)) => Some(MenuItem::Entry(entry)),
                Some(Frame::Submenu { title, id, items }) => {
                    Some(MenuItem::Submenu { title, id, items })
                }
                Some(Frame::Other) | None => None,
            };
            if let Some(item) = item {
                // An item goes to the innermost enclosing submenu, or the top.
                let parent = stack.iter_mut().rev().find_map(|f| match f {
                    Frame::Submenu { items, .. } => Some(items),
                    _ => None,
                });
                parent.unwrap_or(&mut top).push(item);
            }
            continue;
        }
        if w.last().is_some_and(|l| l == "{") {
            if skipped > 0 || stack.len() >= MAX_DEPTH || items >= MAX_ITEMS {
                skipped += 1;
                continue;
            }
            let title = w.get(1).cloned().unwrap_or_default();
            let frame = match first.as_str() {
                "menuentry" => Frame::Entry(MenuEntry {
                    title,
                    id: item_id(&w),
                    ..Default::default()
                }),
                "submenu" => Frame::Submenu {
                    title,
                    id: item_id(&w),
                    items: Vec::new(),
                },
                _ => Frame::Other,
            };
            if !matches!(frame, Frame::Other) {
                items += 1;
            }
            stack.push(frame);
            continue;
        }
        if skipped > 0 {
            continue;
        }
        let in_menu = stack.iter().any(|f| !matches!(f, Frame::Other));
        if let Some(Frame::Entry(entry)) = stack.last_mut() {
            match first.as_str() {
                "linux" | "linux16" | "linuxefi" if entry.linux.is_empty() => {
                    entry.linux = w[1..].to_vec()
                }
                "initrd" | "initrd16" | "initrdefi" if entry.initrd.is_empty() => {
                    entry.initrd = w[1..].to_vec()
                }
                _ => {}
            }
        } else if !in_menu && first == "set" {
            if let Some(value) = w.get(1).and_then(|a| a.strip_prefix("default=")) {
                match value {
                    "${saved_entry}" | "$saved_entry" => {
                        if let Some(saved) = saved_entry.filter(|s| !s.is_empty()) {
                            default = Some(saved.to_string());
                        }
                    }
                    v if v.contains('$') => {}
                    v => default = Some(v.to_string()),
                }
            }
        }
    }
    GrubConfig {
        items: top,
        default,
    }
}

impl GrubConfig {
    /// The entry GRUB boots by default: `default` is an index, a title or an
    /// id, with `>` stepping into submenus (`1>2`); unset means 0.
    pub fn default_entry(&self) -> Option<&MenuEntry> {
        let default = self.default.as_deref().unwrap_or("0");
        let mut items = &self.items;
        let mut parts = default.split('>').peekable();
        while let Some(part) = parts.next() {
            let item = match part.parse::<usize>() {
                Ok(n) => items.get(n)?,
                Err(_) => items.iter().find(|i| match i {
                    MenuItem::Entry(e) => e.title == part || e.id.as_deref() == Some(part),
                    MenuItem::Submenu { title, id, .. } => {
                        title == part || id.as_deref() == Some(part)
                    }
                })?,
            };
            match (item, parts.peek().is_none()) {
                (MenuItem::Entry(entry), true) => return Some(entry),
                (MenuItem::Submenu { items: inner, .. }, false) => items = inner,
                _ => return None,
            }
        }
        None
    }
}

/// `name=value` lines of grubenv.
pub fn grubenv_value<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

/// Applies the shell assignments (`NAME=value`, `export NAME=value`) of
/// /etc/default/grub or one of its grub.d fragments to `vars`, expanding
/// `$NAME` from what is set so far (unset is empty, as in the shell).
pub fn apply_shell_assignments(text: &str, vars: &mut BTreeMap<String, String>) {
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, rest)) = line.split_once('=') else {
            continue;
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || rest.starts_with(char::is_whitespace) {
            continue;
        }
        let expand = |n: &str| vars.get(n).cloned().unwrap_or_default();
        // The value is the first word; a second word would be a command.
        let value = words(rest, Some(&expand))
            .into_iter()
            .next()
            .unwrap_or_default();
        if value.len() > MAX_VALUE || (vars.len() >= MAX_VARS && !vars.contains_key(name)) {
            continue;
        }
        vars.insert(name.to_string(), value);
    }
}

/// Debian's version ordering (dpkg's `verrevcmp`): digits compare as
/// numbers, `~` sorts before anything (even the end), letters before other
/// characters. Used on kernel release strings (`6.1.0-18-amd64`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn order(c: Option<&u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(&c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(&c) => i32::from(c) + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let digit = |s: &[u8], i: usize| s.get(i).is_some_and(u8::is_ascii_digit);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i)), order(b.get(j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a grub.cfg written by Debian 12's update-grub.
    const DEBIAN_GRUB_CFG: &str = r#"
#
# DO NOT EDIT THIS FILE
#
### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi

function savedefault {
  if [ -z "${boot_once}" ]; then
    saved_entry="${chosen}"
    save_env saved_entry
  fi
}
function load_video {
  insmod all_video
}
### BEGIN /etc/grub.d/10_linux ###
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-1234' {
	load_video
	insmod ext2
	search --no-floppy --fs-uuid --set=root 1234
	echo	'Loading Linux 6.1.0-18-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro  quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-18-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-1234' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-18-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-18-amd64-advanced-1234' {
		linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro  quiet
		initrd	/boot/initrd.img-6.1.0-18-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-18-amd64 (recovery mode)' --class debian $menuentry_id_option 'gnulinux-6.1.0-18-amd64-recovery-1234' {
		linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro single
		initrd	/boot/initrd.img-6.1.0-18-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-9-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-9-amd64-advanced-1234' {
		linux	/boot/vmlinuz-6.1.0-9-amd64 root=UUID=1234 ro  quiet
		initrd	/boot/intel-ucode.img /boot/initrd.img-6.1.0-9-amd64
	}
}
### END /etc/grub.d/10_linux ###
"#;

    fn linux_of(cfg: &GrubConfig) -> Option<&str> {
        cfg.default_entry().map(|e| e.linux[0].as_str())
    }

    #[test]
    fn debian_grub_cfg_default_is_the_first_entry() {
        let cfg = parse_grub_cfg(DEBIAN_GRUB_CFG, None);
        assert_eq!(cfg.default.as_deref(), Some("0"));
        let entry = cfg.default_entry().unwrap();
        assert_eq!(entry.title, "Debian GNU/Linux");
        assert_eq!(entry.id.as_deref(), Some("gnulinux-simple-1234"));
        assert_eq!(
            entry.linux,
            [
                "/boot/vmlinuz-6.1.0-18-amd64",
                "root=UUID=1234",
                "ro",
                "quiet"
            ]
        );
        assert_eq!(entry.initrd, ["/boot/initrd.img-6.1.0-18-amd64"]);
        assert_eq!(cfg.items.len(), 2);
    }

    #[test]
    fn grub_default_by_index_title_id_and_saved_entry() {
        let with = |default: &str| DEBIAN_GRUB_CFG.replace("set default=\"0\"", default);
        let cfg = parse_grub_cfg(&with("set default=\"1>2\""), None);
        assert_eq!(linux_of(&cfg), Some("/boot/vmlinuz-6.1.0-9-amd64"));
        assert_eq!(cfg.default_entry().unwrap().initrd.len(), 2);
        let cfg = parse_grub_cfg(
            &with("set default='Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux 6.1.0-18-amd64 (recovery mode)'"),
            None,
        );
        assert_eq!(cfg.default_entry().unwrap().linux[3], "single");
        let cfg = parse_grub_cfg(
            &with("set default=gnulinux-advanced-1234>gnulinux-6.1.0-9-amd64-advanced-1234"),
            None,
        );
        assert_eq!(linux_of(&cfg), Some("/boot/vmlinuz-6.1.0-9-amd64"));
        let saved = with("set default=\"${saved_entry}\"");
        let cfg = parse_grub_cfg(&saved, Some("1>2"));
        assert_eq!(linux_of(&cfg), Some("/boot/vmlinuz-6.1.0-9-amd64"));
        // No saved entry: the literal default before it is not overridden
        // by an unknown variable; here there is none, so entry 0.
        let cfg = parse_grub_cfg(&saved, None);
        assert_eq!(linux_of(&cfg), Some("/boot/vmlinuz-6.1.0-18-amd64"));
    }

    #[test]
    fn grub_default_naming_nothing_bootable_gives_none() {
        for default in ["7", "1", "1>9", "0>0", "no such title", ""] {
            let cfg = GrubConfig {
                default: Some(default.into()),
                ..parse_grub_cfg(DEBIAN_GRUB_CFG, None)
            };
            assert_eq!(cfg.default_entry(), None, "{default:?}");
        }
        assert_eq!(parse_grub_cfg("", None).default_entry(), None);
    }

    #[test]
    fn grub_cfg_nesting_and_garbage_are_bounded() {
        let deep = "submenu x {\n".repeat(100_000) + &"}\n".repeat(100_000);
        let cfg = parse_grub_cfg(&deep, None);
        assert_eq!(cfg.default_entry(), None);
        let unbalanced = "}\n}\nmenuentry 'a' {\nlinux /k\n";
        assert_eq!(parse_grub_cfg(unbalanced, None).default_entry(), None);
        let binary: String = (0..20_000u32)
            .map(|i| char::from_u32(i % 0x800 + 1).unwrap_or('x'))
            .collect();
        let _ = parse_grub_cfg(&binary, None);
    }

    #[test]
    fn shell_words_quote_escape_and_expand() {
        assert_eq!(
            words(r#"a 'b c' "d \"e\" \$f" g\ h # comment"#, None),
            ["a", "b c", "d \"e\" $f", "g h"]
        );
        assert_eq!(words("'it'\\''s'", None), ["it's"]);
        let expand = |n: &str| {
            if n == "X" {
                "1 2".to_string()
            } else {
                String::new()
            }
        };
        assert_eq!(
            words("\"$X ${X}-$Y\" '$X'", Some(&expand)),
            ["1 2 1 2-", "$X"]
        );
    }

    #[test]
    fn default_grub_assignments_follow_the_shell() {
        let mut vars = BTreeMap::new();
        apply_shell_assignments(
            "# comment\nGRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n\
             GRUB_CMDLINE_LINUX='console=ttyS0,115200 net.ifnames=0'\n\
             export GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT splash\"\n\
             GRUB_TERMINAL=console # trailing comment\nNOT AN ASSIGNMENT\nX= command\n",
            &mut vars,
        );
        assert_eq!(vars["GRUB_CMDLINE_LINUX_DEFAULT"], "quiet splash");
        assert_eq!(
            vars["GRUB_CMDLINE_LINUX"],
            "console=ttyS0,115200 net.ifnames=0"
        );
        assert_eq!(vars["GRUB_TERMINAL"], "console");
        assert!(!vars.contains_key("X"));
    }

    #[test]
    fn grubenv_values() {
        let env = "# GRUB Environment Block\nsaved_entry=1>2\nnext_entry=\n#####";
        assert_eq!(grubenv_value(env, "saved_entry"), Some("1>2"));
        assert_eq!(grubenv_value(env, "next_entry"), Some(""));
        assert_eq!(grubenv_value(env, "other"), None);
    }

    #[test]
    fn kernel_versions_sort_as_debian_sorts_them() {
        use Ordering::*;
        let cases = [
            ("6.1.0-18-amd64", "6.1.0-9-amd64", Greater),
            ("6.1.0-18-amd64", "6.1.0-18-amd64", Equal),
            ("6.12.9+bpo-amd64", "6.1.0-18-amd64", Greater),
            ("5.10.0-28-amd64", "6.1.0-1-amd64", Less),
            ("6.1.0-18-amd64", "6.1.0-18-cloud-amd64", Less),
            ("6.1.0~rc1-amd64", "6.1.0-amd64", Less),
            ("6.1", "6.1.0", Less),
            ("6.01", "6.1", Equal),
            ("1.0a", "1.0+", Less),
            ("", "0", Equal),
            ("~", "", Less),
        ];
        for (a, b, expected) in cases {
            assert_eq!(compare_versions(a, b), expected, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), expected.reverse(), "{b} vs {a}");
        }
        let mut v = vec![
            "6.1.0-9-amd64",
            "6.1.0-18-amd64",
            "5.10.0-28-amd64",
            "6.1.0-10-amd64",
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            [
                "5.10.0-28-amd64",
                "6.1.0-9-amd64",
                "6.1.0-10-amd64",
                "6.1.0-18-amd64"
            ]
        );
    }
}
