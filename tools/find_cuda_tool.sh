#!/usr/bin/env bash
# Prints the path of a CUDA command-line tool (cuobjdump, nvdisasm, ...), or nothing:
#   tools/find_cuda_tool.sh NAME [ENVVAR]
# looked for in $ENVVAR, PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, then a pip-installed copy
# (nvidia/cu*/bin in the site-packages of $PYTHON or python3, e.g. pip install nvidia-cuda-cuobjdump, or
# the copy that triton ships in triton/backends/nvidia/bin).
set -uo pipefail
name=$1 var=${2:-}
if [[ -n "$var" && -n "${!var:-}" && -x "${!var}" ]]; then echo "${!var}"; exit 0; fi
p=$(command -v "$name" 2>/dev/null) && { echo "$p"; exit 0; }
for d in "${CUDA_HOME:-/nonexistent}/bin" /usr/local/cuda/bin /usr/local/cuda-*/bin; do
  [[ -x "$d/$name" ]] && { echo "$d/$name"; exit 0; }
done
for py in "${PYTHON:-python3}" python3; do
  p=$("$py" -c "import site, glob; hits = [h for s in site.getsitepackages() + [site.getusersitepackages()] for p in ('/nvidia/cu*/bin/', '/triton/backends/nvidia/bin/') for h in glob.glob(s + p + '$name')]; print(hits[0] if hits else '')" 2>/dev/null)
  [[ -n "$p" && -x "$p" ]] && { echo "$p"; exit 0; }
done
exit 0
