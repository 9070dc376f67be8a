#!/bin/sh
# Builds the Debian package of the VMM: target/debian/rustvmm_VERSION_ARCH.deb
#
#   resources/package.sh [--profile release|debug] [--no-build] [--out DIR]
#
#   --profile P   the cargo profile whose binaries are packaged (default:
#                 release; debug packages target/debug, for tests)
#   --no-build    package the binaries already built (cargo test --workspace
#                 builds the debug ones) instead of running cargo build (and
#                 resources/gen-docs.sh)
#   --out DIR     where the .deb goes (default: target/debian)
#
# Contents: vmm, vmmctl and vmm-web in /usr/bin; their man pages and shell
# completions; the OCF agent as ocf:rustvmm:vmm; the systemd units
# vmm@.service (a guest from /etc/vmm/NAME.json) and vmm-web.service; the
# README, the cluster and memory documents and example configs under
# /usr/share/doc/rustvmm. Nothing is enabled or started on installation.
#
# Man pages and completions come from resources/gen-docs.sh when it exists
# (it writes target/man/*.1 and target/completions/*, generated from the
# command-line definitions); without it, man pages are made from each
# binary's --help with help2man, and completions are left out.
#
# The package is built with dpkg-deb from a staged tree rather than with
# cargo-deb: it spans three crates' binaries plus files from resources/,
# and dpkg-deb (part of dpkg) needs nothing compiled or downloaded.
set -eu

profile=release
build=1
out=
while [ $# -gt 0 ]; do
	case "$1" in
	--profile) profile=$2; shift 2 ;;
	--no-build) build=; shift ;;
	--out) out=$2; shift 2 ;;
	-h | --help) sed -n '2,25p' "$0"; exit 0 ;;
	*) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
case "$profile" in
release) cargo_profile=release; dir=release ;;
debug | dev) cargo_profile=dev; dir=debug ;;
*) echo "package.sh: --profile must be release or debug" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
bin=$target/$dir
out=${out:-$target/debian}
name=rustvmm
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)

if [ -n "$build" ]; then
	cargo build --profile "$cargo_profile" -p vmm -p api -p web --bins
fi
for b in vmm vmmctl vmm-web; do
	[ -x "$bin/$b" ] || {
		echo "package.sh: $bin/$b is missing (build it, or drop --no-build)" >&2
		exit 1
	}
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
doc=$root/usr/share/doc/$name

# install_file SRC DEST MODE
install_file() {
	mkdir -p "$(dirname "$2")"
	cp "$1" "$2"
	chmod "$3" "$2"
}

for b in vmm vmmctl vmm-web; do
	install_file "$bin/$b" "$root/usr/bin/$b" 0755
	strip --strip-unneeded "$root/usr/bin/$b" 2>/dev/null || true
done

# The repository's files name /usr/local/bin (an install from source);
# the package's binaries are in /usr/bin.
packaged() {
	sed -e 's,/usr/local/bin/,/usr/bin/,g' "$1" >"$2"
	chmod "$3" "$2"
}
mkdir -p "$root/usr/lib/ocf/resource.d/rustvmm" "$root/lib/systemd/system"
packaged resources/ocf/vmm "$root/usr/lib/ocf/resource.d/rustvmm/vmm" 0755
for unit in vmm@.service vmm-web.service; do
	packaged "resources/systemd/$unit" "$root/lib/systemd/system/$unit" 0644
done

# Man pages and completions: the generator's, or --help through help2man.
# (With --no-build nothing is built: pages generated earlier are used.)
if [ -n "$build" ] && [ -x resources/gen-docs.sh ]; then
	resources/gen-docs.sh
fi
mkdir -p "$root/usr/share/man/man1"
if ls "$target"/man/*.1 >/dev/null 2>&1; then
	for page in "$target"/man/*.1; do
		gzip -9n <"$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
	done
elif command -v help2man >/dev/null; then
	for b in vmm vmmctl vmm-web; do
		help2man --no-info --no-discard-stderr --name "$(
			case $b in
			vmm) echo "one virtual machine monitor process per guest, on /dev/kvm" ;;
			vmmctl) echo "drive a vmm over its REST API socket" ;;
			vmm-web) echo "the host web console for the VMMs of this host" ;;
			esac
		)" "$bin/$b" | gzip -9n >"$root/usr/share/man/man1/$b.1.gz"
	done
else
	echo "package.sh: no man pages: neither resources/gen-docs.sh nor help2man" >&2
fi
if [ -d "$target/completions" ]; then
	for f in "$target"/completions/*; do
		[ -f "$f" ] || continue
		case "$(basename "$f")" in
		*.bash) install_file "$f" "$root/usr/share/bash-completion/completions/$(basename "$f" .bash)" 0644 ;;
		*.fish) install_file "$f" "$root/usr/share/fish/vendor_completions.d/$(basename "$f")" 0644 ;;
		_*) install_file "$f" "$root/usr/share/zsh/vendor-completions/$(basename "$f")" 0644 ;;
		esac
	done
fi

# Documentation and examples.
install_file README.md "$doc/README.md" 0644
for d in cluster.md memory-overcommit.md; do
	install_file "docs/$d" "$doc/$d" 0644
done
for f in resources/examples/*.json resources/ocf/examples/*; do
	install_file "$f" "$doc/examples/$(basename "$f")" 0644
done
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: rustvmm

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
mkdir -p "$root/etc/vmm"

# Maintainer scripts: systemd learns about the units; nothing is enabled.
mkdir -p "$root/DEBIAN"
for script in postinst postrm; do
	cat >"$root/DEBIAN/$script" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
EOF
	chmod 0755 "$root/DEBIAN/$script"
done

# Shared-library dependencies of the binaries, as dpkg-shlibdeps finds them.
depends="libc6, libgcc-s1"
if command -v dpkg-shlibdeps >/dev/null; then
	mkdir -p "$stage/debian"
	printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" >"$stage/debian/control"
	found=$(cd "$stage" && dpkg-shlibdeps -O root/usr/bin/vmm root/usr/bin/vmmctl root/usr/bin/vmm-web 2>/dev/null |
		sed -n 's/^shlibs:Depends=//p')
	[ -n "$found" ] && depends=$found
fi
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: rustvmm developers <root@localhost>
Installed-Size: $size
Depends: $depends
Recommends: jq, iproute2
Suggests: pacemaker, resource-agents, crmsh, drbd-utils
Section: admin
Priority: optional
Description: one lean VMM process per guest on /dev/kvm, for small HA clusters
 A virtual machine monitor in Rust: virtio-pci disks and NICs, ACPI,
 live migration, snapshots, ballooning, booting installed guests from
 their own disks. One vmm process per guest, driven over a REST API on a
 Unix socket by vmmctl, a systemd template unit (vmm@NAME from
 /etc/vmm/NAME.json) or Pacemaker through the OCF agent ocf:rustvmm:vmm.
 vmm-web is a web console for the guests of a host.
EOF
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | sort | xargs md5sum) >"$root/DEBIAN/md5sums"

mkdir -p "$out"
deb=$out/${name}_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
