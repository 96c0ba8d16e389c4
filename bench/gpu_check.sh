#!/usr/bin/env bash
# verify --device cuda on the bench's 0.6B and 8B shapes, fp32 and bf16 references.
#
#   bench/gpu_check.sh                         # both shapes, both reference dtypes, Q8_0
#   bench/gpu_check.sh --shapes 0.6b --dtypes bfloat16 --outtype f16
#   bench/gpu_check.sh --dry-run               # print what would run (no GPU needed)
#
# Checkpoints come from bench/make_checkpoint.py (0.6B) and bench/make_big_checkpoint.py (8B,
# ~16 GB under --work) when absent; each is converted once per outtype with mmconvert to-gguf.
# Each verify prints its table and one line per stage (time, peak RSS, peak GPU memory); a
# summary follows. Exit status: 0 every run passed, 1 a parity failure, 2 no CUDA or bad usage.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
shapes="0.6b,8b"
dtypes="float32,bfloat16"
outtype="q8_0"
work="${MMCONVERT_BENCH_WORK:-/work/bigtmp}"
[[ -d "$work" ]] || work="$here/_work"
dry_run=0

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $1" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --shapes) [[ $# -ge 2 ]] || die "--shapes needs a value (0.6b,8b)"; shapes="$2"; shift 2 ;;
    --dtypes) [[ $# -ge 2 ]] || die "--dtypes needs a value (float32,bfloat16)"; dtypes="$2"; shift 2 ;;
    --outtype) [[ $# -ge 2 ]] || die "--outtype needs a value (q8_0, f16, q4_k_m, ...)"; outtype="$2"; shift 2 ;;
    --work) [[ $# -ge 2 ]] || die "--work needs a folder"; work="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

IFS=, read -r -a shape_list <<< "$shapes"
IFS=, read -r -a dtype_list <<< "$dtypes"
for s in "${shape_list[@]}"; do
  [[ "$s" == "0.6b" || "$s" == "8b" ]] || die "--shapes: unknown shape '$s' (0.6b, 8b)"
done
for d in "${dtype_list[@]}"; do
  [[ "$d" == "float32" || "$d" == "bfloat16" ]] || die "--dtypes: unknown dtype '$d' (float32, bfloat16)"
done

run() {  # print, then run unless --dry-run
  echo "+ $*" >&2
  [[ $dry_run -eq 1 ]] || "$@"
}

if [[ $dry_run -eq 0 ]]; then
  "$python" - <<'EOF' || die "no CUDA device: torch sees none (this check needs a GPU; --dry-run shows what it would run)"
import sys
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU", file=sys.stderr)
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    free, total = torch.cuda.mem_get_info(i)
    print(f"cuda:{i}: {torch.cuda.get_device_name(i)}, {free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
EOF
fi

checkpoint_args() {  # shape -> the source arguments of mmconvert (printed on stdout)
  local shape="$1" line
  if [[ $dry_run -eq 1 ]]; then echo "<$shape checkpoint>"; return; fi
  if [[ "$shape" == "0.6b" ]]; then
    line="$(cd "$root" && "$python" bench/make_checkpoint.py | sed -n 's/^multimodal checkpoint: //p')"
    echo "$line"
  else
    line="$(cd "$root" && "$python" bench/make_big_checkpoint.py 8b --out "$work" | sed -n 's/^mmconvert to-gguf \(.*\) -o OUT$/\1/p')"
    echo "$line"
  fi
}

out="$work/gpu-check"
[[ $dry_run -eq 1 ]] || mkdir -p "$out"
failed=0
reports=()
for shape in "${shape_list[@]}"; do
  read -r -a src <<< "$(checkpoint_args "$shape")"
  [[ ${#src[@]} -gt 0 ]] || die "the $shape generator printed no checkpoint path"
  bundle="$out/$shape-$outtype"
  if [[ ! -f "$bundle/mmconvert.json" ]]; then
    run mmconvert to-gguf "${src[@]}" -o "$bundle" --outtype "$outtype" -q --force
  fi
  for dtype in "${dtype_list[@]}"; do
    report="$out/$shape-$outtype-$dtype.json"
    echo "== $shape, $outtype, $dtype reference on cuda =="
    start=$(date +%s)
    if run mmconvert verify "${src[@]}" "$bundle" --device cuda --dtype "$dtype" \
        --report-json "$report"; then
      status=pass
      [[ $dry_run -eq 0 ]] || status="not run (dry run)"
    else
      code=$?
      [[ $code -eq 1 ]] || { echo "error: verify exited $code on $shape/$dtype" >&2; exit "$code"; }
      status=FAIL
      failed=1
    fi
    echo "== $shape $dtype: $status in $(( $(date +%s) - start )) s =="
    reports+=("$report")
  done
done

if [[ $dry_run -eq 0 ]]; then
  echo
  echo "summary (time, peak RSS, peak GPU per stage):"
  "$python" - "${reports[@]}" <<'EOF'
import json, sys
for path in sys.argv[1:]:
    doc = json.load(open(path))
    print(f"{path}: {'PASS' if doc['passed'] else 'FAIL'}")
    for s in doc["stages"]:
        gpu = s["peak_gpu_bytes"]
        print(f"  {s['name']}: {s['seconds']:.1f}s, RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"GPU {'-' if gpu is None else f'{gpu / 2**30:.2f} GiB'}")
EOF
fi
exit "$failed"
