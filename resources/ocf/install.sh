#!/bin/sh
# Installs the OCF resource agent for the project's VMM, and optionally the
# vmm and vmmctl binaries, on one cluster node (run it on every node).
#
#   resources/ocf/install.sh [--provider NAME] [--root DIR] [--binaries DIR] [--bindir DIR]
#
#   --provider NAME  OCF provider directory (default: rustvmm), so the agent is
#                    ocf:NAME:vmm at $OCF_ROOT/resource.d/NAME/vmm
#   --root DIR       install below DIR instead of / (packaging)
#   --binaries DIR   also install DIR/vmm and DIR/vmmctl (e.g. target/release)
#   --bindir DIR     where the binaries go (default: /usr/local/bin, the
#                    agent's default vmm_binary and vmmctl_binary)
#
# Files are written to a temporary name and renamed, so a running cluster
# never executes a half-written agent.
set -eu

provider=rustvmm
root=
binaries=
bindir=/usr/local/bin
while [ $# -gt 0 ]; do
	case "$1" in
	--provider) provider=$2; shift 2 ;;
	--root) root=${2%/}; shift 2 ;;
	--binaries) binaries=$2; shift 2 ;;
	--bindir) bindir=$2; shift 2 ;;
	-h | --help) sed -n '2,15p' "$0"; exit 0 ;;
	*) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
case "$provider" in
"" | *[!A-Za-z0-9._-]*) echo "install.sh: bad provider name '$provider'" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
ocf_root=${OCF_ROOT:-/usr/lib/ocf}

# install_file SRC DEST MODE
install_file() {
	mkdir -p "$(dirname "$2")"
	tmp="$2.tmp.$$"
	cp "$1" "$tmp"
	chmod "$3" "$tmp"
	mv -f "$tmp" "$2"
	echo "installed $2"
}

install_file "$here/vmm" "$root$ocf_root/resource.d/$provider/vmm" 0755

if [ -n "$binaries" ]; then
	for b in vmm vmmctl; do
		[ -x "$binaries/$b" ] || {
			echo "install.sh: $binaries/$b is missing (cargo build --release first)" >&2
			exit 1
		}
		install_file "$binaries/$b" "$root$bindir/$b" 0755
	done
fi
