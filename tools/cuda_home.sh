#!/usr/bin/env bash
# Prints the CUDA toolkit root of the nvcc that a build would use (${NVCC:-nvcc}): $CUDA_HOME if set,
# else the TOP that nvcc itself reports (right where nvcc on PATH is a wrapper script or a symlink,
# where dirname(dirname(nvcc)) is not the toolkit), else nothing.
set -uo pipefail
if [[ -n "${CUDA_HOME:-}" ]]; then echo "$CUDA_HOME"; exit 0; fi
top=$("${NVCC:-nvcc}" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
[[ -n "$top" ]] && readlink -f "$top"
