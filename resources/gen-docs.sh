#!/bin/sh
# Generates the man pages and shell completions of vmm and vmmctl from their
# command-line definitions (clap), into target/man/ and target/completions/
# (or DIR/man/ and DIR/completions/): vmm.1, vmmctl.1, vmmctl-COMMAND.1;
# bash (vmm.bash, vmmctl.bash), zsh (_vmm, _vmmctl) and fish (*.fish).
#
# Usage: resources/gen-docs.sh [DIR]    (PROFILE=dev for a debug build)
set -eu
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
case $profile in
dev) bin=target/debug ;;
*) bin=target/$profile ;;
esac
out=${1:-target}
cargo build --profile "$profile" -p vmm -p api --bin vmm --bin vmmctl
"$bin/vmm" --generate-docs "$out"
"$bin/vmmctl" --generate-docs "$out"
echo "man pages in $out/man, completions in $out/completions"
