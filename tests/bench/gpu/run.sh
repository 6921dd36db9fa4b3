#!/usr/bin/env bash
# The llama.cpp GPU proof, in one command, on a machine with an NVIDIA GPU,
# nvcc, cmake and ninja (no Docker needed):
#
#   tests/bench/gpu/run.sh [build] [build-default] [models] [serve] [plan]
#
# build          the project's build script, natively, for this GPU's architecture (timed)
# build-default  the same with llama.cpp's default architecture list, time-boxed
#                (CORTEX_DEFAULT_BUILD_BUDGET seconds) and extrapolated from objects compiled
# models         random-weight GGUFs of real shapes (tests/bench/gpu/make_random_gguf.py)
# serve          llama-server flag sets side by side (tests/bench/gpu/bench_llamacpp.py)
# plan           a second model shape served, for model_plan's estimate against measured memory
# prefix         llama-server's prompt-cache flags (--cache-ram, --cache-reuse) with the role's
#                GPU line, under the multi-turn traffic prefix affinity sends one replica
#                (tests/bench/gpu/prefix_cache.py)
# moe            gpt-oss-120b's shape (MXFP4 experts, sliding windows; experts left as zero
#                holes so that 59 GiB fit a small disk) with the role's GPU line: memory
#                against model_plan at 32 slots x 8k, 4 x 32k, 1 x 128k, 4 x 32k with a q8_0
#                KV cache, with 18 layers' experts and with all experts on the host;
#                tokens/s at 1, 8 and 32 streams
# dense          Llama-3-8B Q8_0 with the role's GPU line: the dense planner's accuracy again
# spec           speculative decoding: Llama-3-8B Q8_0 (random weights) with and without a
#                Llama-3.2-1B F16 draft (the same vocabulary), at synthetic acceptance lengths
#                (llama-server accepts drafted tokens at random: random weights agree on
#                nothing, so a real acceptance rate cannot be had from them), tokens/s at 1
#                and 8 streams, and memory against model_plan with the draft counted
# buffers        llama.cpp's own account of weights, KV cache and compute buffer with nothing
#                allocated (llama-fit-params --fit-print), beside model_plan's, for gpt-oss-120b and
#                Llama-3-8B over slots, contexts up to 1M cells, KV cache types and experts on the host;
#                and a small model served at 32 streams for the CUDA overhead (NVML against buffers)
# advise         gpt-oss-120b at 32 slots of a context that does not fit this GPU (the role's command
#                line), and every "would fit" setting model_plan offers, served: loaded or not, NVML
#                against the plan, tokens/s at 1 and 32 streams (tests/bench/gpu/advise.py)
# advise-dense   the same for Llama-3-8B Q8_0
# multi          (2 GPUs) a Llama-3-70B-shaped Q8_0 GGUF served across both GPUs with the
#                command line the role renders for gpus [0, 1], per split mode (layer, row,
#                tensor where this llama.cpp has it), then on one GPU at a context that fits it
#
# Without arguments it runs every step. Steps resume: what is built or written
# is kept under CORTEX_GPU_WORK (default /tmp/cortex-gpu); results go to $OUT
# (or CORTEX_GPU_WORK/out).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
work="${CORTEX_GPU_WORK:-/tmp/cortex-gpu}"
out="${OUT:-$work/out}"
tarball="${CORTEX_LLAMACPP_TARBALL:-$(ls "$repo"/.lcsrc/llama.cpp-*.tar.gz 2>/dev/null | head -n1)}"
deadline="${CORTEX_BENCH_DEADLINE:-0}"
mkdir -p "$work" "$out"
steps=("$@")
((${#steps[@]})) || steps=(build build-default models serve plan)
log() { printf '[gpu %s] %s\n' "$(date +%T)" "$*" >&2; }
# model SHAPE QTYPE [--fill KIND]: the path of that random-weight GGUF, written once.
model() {
  local file="$work/models/$1-$2.gguf"
  mkdir -p "$work/models"
  [[ -f "$file" ]] || { log "writing $file"; python3 "$repo/tests/bench/gpu/make_random_gguf.py" "$1" "$2" "$file.part" "${@:3}" >&2 && mv "$file.part" "$file"; } || return 1
  printf '%s\n' "$file"
}

# gguf 0.18 or later: the first to read and write MXFP4 tensors.
python3 -c 'import gguf; gguf.GGMLQuantizationType.MXFP4' 2>/dev/null || {
  if [[ -d "$repo/.whl" ]]; then python3 -m pip install -q --no-index --no-deps --find-links "$repo/.whl" 'gguf>=0.18'; else python3 -m pip install -q 'gguf>=0.18'; fi
}
# The planner is imported from this checkout as ansible_collections.cortex.serving.
mkdir -p "$work/collections/ansible_collections/cortex"
ln -sfn "$repo" "$work/collections/ansible_collections/cortex/serving"

arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d .)"
src="$work/src"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
  [[ -f "$tarball" ]] || { echo "no llama.cpp tarball: set CORTEX_LLAMACPP_TARBALL" >&2; exit 2; }
  mkdir -p "$src" && tar -xzf "$tarball" -C "$src" --strip-components=1
fi
version="$(basename "$tarball" .tar.gz | sed 's/^llama.cpp-//')"
server="$work/sm$arch/bin/llama-server"

for step in "${steps[@]}"; do
  case "$step" in
    build)
      if [[ ! -x "$server" ]]; then
        log "building llama-server for sm_$arch with $(nproc) jobs"
        start=$(date +%s)
        "$repo/images/llamacpp-server/build-llama-server.sh" --source "$src" --prefix "$work/sm$arch" \
          --backend cuda --cuda-architectures "$arch" --version "$version" --jobs "$(nproc)" \
          --build-dir "$work/build-sm$arch" 2>&1 | tail -n 3
        seconds=$(( $(date +%s) - start ))
        cuda_objects=$(find "$work/build-sm$arch" -name '*.cu.o' | wc -l)
        printf '{"architectures": "%s", "seconds": %d, "cuda_objects": %d, "jobs": %d}\n' \
          "$arch" "$seconds" "$cuda_objects" "$(nproc)" >"$out/build-sm$arch.json"
        log "built in $seconds s"
      fi
      ;;
    build-default)
      budget="${CORTEX_DEFAULT_BUILD_BUDGET:-240}"
      dir="$work/build-default"
      log "building with llama.cpp's default CUDA architectures for at most $budget s"
      start=$(date +%s)
      timeout "$budget" "$repo/images/llamacpp-server/build-llama-server.sh" --source "$src" \
        --prefix "$work/default" --backend cuda --cuda-architectures default --version "$version" \
        --jobs "$(nproc)" --build-dir "$dir" >/dev/null 2>&1 || true
      seconds=$(( $(date +%s) - start ))
      done_cu=$(find "$dir" -name '*.cu.o' | wc -l)
      left_cu=$(ninja -C "$dir" -n llama-server llama-bench 2>/dev/null | grep -c '\.cu\.o' || true)
      # llama.cpp picks its list inside its CMakeLists; read it from nvcc's flags.
      archs=$(grep -o 'arch=compute_[0-9a-z]*' "$dir/build.ninja" | sort -u | sed 's/arch=compute_//' | paste -sd';' || true)
      printf '{"architectures": "%s", "seconds": %d, "cuda_objects_done": %d, "cuda_objects_left": %d, "finished": %s}\n' \
        "$archs" "$seconds" "$done_cu" "$left_cu" "$([[ -x $work/default/bin/llama-server ]] && echo true || echo false)" \
        >"$out/build-default.json"
      log "default list ($archs): $done_cu CUDA objects in $seconds s, $left_cu left"
      ;;
    models)
      model llama3-8b Q8_0 >/dev/null
      model llama3.2-1b F16 >/dev/null
      ;;
    serve)
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" \
        --model "$work/models/llama3-8b-Q8_0.gguf" --out "$out/serve-llama3-8b-q8_0.json" \
        --collections "$work/collections" --deadline "$deadline" \
        --config "stock=" \
        --config "baseline_best=--parallel 16 -c 65536 -fa on -b 2048 -ub 512 --cache-ram 0" \
        --config "cortex_default=--parallel 32 -c 262144 -kvu -fa on -b 512 -ub 512 --cache-ram 0" \
        ${CORTEX_EXTRA_CONFIGS:-} >/dev/null
      ;;
    plan)
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" \
        --model "$work/models/llama3.2-1b-F16.gguf" --out "$out/serve-llama3.2-1b-f16.json" \
        --collections "$work/collections" --deadline "$deadline" --levels 8 \
        --config "p8_ctx32k=--parallel 8 -c 32768 -fa on --cache-ram 0" \
        --config "p4_ctx16k_q8kv=--parallel 4 -c 16384 -fa on -ctk q8_0 -ctv q8_0 --cache-ram 0" >/dev/null
      ;;
    prefix)
      file="$(model llama3-8b Q8_0)"
      # The role's GPU line (model_servers_llamacpp_gpu_defaults), then the prompt cache on.
      role="--parallel 32 -c 262144 -kvu -fa on -b 512 -ub 512"
      python3 "$repo/tests/bench/gpu/prefix_cache.py" --server "$server" --model "$file" \
        --out "$out/prefix-cache-llama3-8b-q8_0.json" --conversations 64 --words 800 --limit 60 --unique-requests 64 \
        --config "cache_ram_0=$role --cache-ram 0" \
        --config "cache_ram_8g=$role --cache-ram 8192" \
        --config "cache_ram_8g_reuse_256=$role --cache-ram 8192 --cache-reuse 256"
      ;;
    moe)
      file="$(model gpt-oss-120b MXFP4 --fill sparse-experts)"
      # model_servers_llamacpp_gpu_defaults, as the role renders them.
      role="--n-gpu-layers 999 --kv-unified --flash-attn on --batch-size 512 --ubatch-size 512 --cache-ram 0"
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" --model "$file" \
        --out "$out/serve-gpt-oss-120b.json" --collections "$work/collections" --deadline "$deadline" \
        --n-predict 64 --levels 1,8,32 \
        --config "slots32_ctx8k=--parallel 32 --ctx-size 262144 $role" >/dev/null
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" --model "$file" \
        --out "$out/serve-gpt-oss-120b-plan.json" --collections "$work/collections" --deadline "$deadline" \
        --n-predict 32 --levels 1 \
        --config "slots4_ctx32k=--parallel 4 --ctx-size 131072 $role" \
        --config "slots1_ctx128k=--parallel 1 --ctx-size 131072 $role" \
        --config "slots4_ctx32k_q8_0_kv=--parallel 4 --ctx-size 131072 $role --cache-type-k q8_0 --cache-type-v q8_0" \
        --config "slots4_ctx32k_n_cpu_moe18=--parallel 4 --ctx-size 131072 $role --n-cpu-moe 18" \
        --config "slots4_ctx32k_cpu_moe=--parallel 4 --ctx-size 131072 $role --cpu-moe" >/dev/null
      ;;
    dense)
      file="$(model llama3-8b Q8_0)"
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" --model "$file" \
        --out "$out/serve-llama3-8b-plan.json" --collections "$work/collections" --deadline "$deadline" \
        --n-predict 32 --levels 1 \
        --config "slots32_ctx8k=--parallel 32 --ctx-size 262144 --n-gpu-layers 999 --kv-unified --flash-attn on --batch-size 512 --ubatch-size 512 --cache-ram 0" >/dev/null
      ;;
    spec)
      file="$(model llama3-8b Q8_0)"
      draft="$(model llama3.2-1b F16)"
      role="--parallel 8 --ctx-size 32768 --n-gpu-layers 999 --kv-unified --flash-attn on --batch-size 512 --ubatch-size 512 --cache-ram 0"
      spec="--spec-type draft-simple --spec-draft-model $draft --spec-draft-ngl 999 --spec-draft-n-max 8 --spec-draft-n-min 0 --spec-draft-p-min 0"
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" --model "$file" \
        --out "$out/spec-llama3-8b-draft-1b.json" --collections "$work/collections" --deadline "$deadline" \
        --n-predict 128 --levels 1,8 \
        --config "no_draft=$role" \
        --config "draft_accept_len_1=$role $spec --spec-synth-len 1" \
        --config "draft_accept_len_3=$role $spec --spec-synth-len 3" \
        --config "draft_accept_len_5=$role $spec --spec-synth-len 5" \
        --config "draft_accept_len_9=$role $spec --spec-synth-len 9" >/dev/null
      ;;
    multi)
      file="$(model llama3-70b Q8_0)"
      # What the role renders for gpus [0, 1] with the GPU defaults: 32 slots in
      # one KV pool of 32 x 8192 tokens, every layer on the GPUs.
      role="--parallel 32 -c 262144 -ngl 999 -fa on -b 512 -ub 512 --cache-ram 0 -kvu"
      modes=(layer row)
      "$server" --help 2>/dev/null | grep -q -- '--split-mode.*tensor\|tensor.*split' && modes+=(tensor)
      configs=()
      for mode in "${modes[@]}"; do configs+=(--config "two_gpus_$mode=$role -sm $mode"); done
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" --model "$file" \
        --out "$out/serve-llama3-70b-q8_0-2gpu.json" --collections "$work/collections" \
        --deadline "$deadline" --n-predict 64 "${configs[@]}" >/dev/null
      # One GPU of the two: the largest power-of-two context that fits it.
      CUDA_VISIBLE_DEVICES=0 python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" \
        --model "$file" --out "$out/serve-llama3-70b-q8_0-1gpu.json" --collections "$work/collections" \
        --deadline "$deadline" --n-predict 64 \
        --config "one_gpu=--parallel 32 -c 131072 -ngl 999 -fa on -b 512 -ub 512 --cache-ram 0 -kvu" >/dev/null
      ;;
    buffers)
      # llama.cpp's own account of every buffer (weights, KV, compute) with
      # nothing allocated (llama-fit-params --fit-print), beside model_plan's,
      # for command lines too large to load, and the CUDA overhead of a
      # process (NVML against its buffers) after 32 streams ran.
      fit="$work/build-sm$arch/bin/llama-fit-params"
      if [[ ! -x "$fit" ]]; then
        # The role's line has --kv-unified, which llama-fit-params does not
        # take: the bench's build of it does (the option's examples widened).
        sed -i 's/set_env("LLAMA_ARG_KV_UNIFIED").set_examples({LLAMA_EXAMPLE_SERVER,/set_env("LLAMA_ARG_KV_UNIFIED").set_examples({LLAMA_EXAMPLE_FIT_PARAMS, LLAMA_EXAMPLE_SERVER,/' "$src/common/arg.cpp"
        cmake --build "$work/build-sm$arch" --target llama-fit-params -j "$(nproc)" 2>&1 | tail -n 2
      fi
      oss="$(model gpt-oss-120b MXFP4 --fill sparse-experts)"
      dense="$(model llama3-8b Q8_0)"
      small="$(model llama3.2-1b F16)"
      role="-ngl 999 -kvu -fa on -b 512 -ub 512"
      oss_configs=()
      for slots_ctx in "32 262144" "32 1048576" "32 565248" "17 557056" "32 524288" "8 262144" "4 131072" "1 131072"; do
        read -r slots ctx <<<"$slots_ctx"
        oss_configs+=(--config "p${slots}_c${ctx}=$role -np $slots -c $ctx")
        oss_configs+=(--config "p${slots}_c${ctx}_q8_0=$role -np $slots -c $ctx -ctk q8_0 -ctv q8_0")
      done
      oss_configs+=(
        --config "p32_c1048576_ncmoe11=$role -np 32 -c 1048576 --n-cpu-moe 11"
        --config "p32_c1048576_q8_0_ncmoe11=$role -np 32 -c 1048576 -ctk q8_0 -ctv q8_0 --n-cpu-moe 11"
        --config "p32_c262144_ncmoe11=$role -np 32 -c 262144 --n-cpu-moe 11"
        --config "p32_c262144_ncmoe36=$role -np 32 -c 262144 --n-cpu-moe 36"
        --config "p32_c262144_cpumoe=$role -np 32 -c 262144 --cpu-moe"
        --config "p32_c262144_ub1024=-ngl 999 -kvu -fa on -b 1024 -ub 1024 -np 32 -c 262144"
        --config "p32_c262144_ub256=-ngl 999 -kvu -fa on -b 256 -ub 256 -np 32 -c 262144"
        --config "p32_c262144_nokvu=-ngl 999 -fa on -b 512 -ub 512 -np 32 -c 262144"
        --config "p32_c262144_q4_0=$role -np 32 -c 262144 -ctk q4_0 -ctv q4_0"
        --config "p32_c262144_kq8_vf16=$role -np 32 -c 262144 -ctk q8_0"
      )
      python3 "$repo/tests/bench/gpu/buffers.py" --fit-params "$fit" --model "$oss" \
        --collections "$work/collections" --out "$out/buffers-gpt-oss-120b.json" "${oss_configs[@]}"
      dense_configs=()
      for slots_ctx in "32 262144" "32 524288" "32 1048576" "8 65536" "1 8192" "1 131072"; do
        read -r slots ctx <<<"$slots_ctx"
        dense_configs+=(--config "p${slots}_c${ctx}=$role -np $slots -c $ctx")
        dense_configs+=(--config "p${slots}_c${ctx}_q8_0=$role -np $slots -c $ctx -ctk q8_0 -ctv q8_0")
      done
      python3 "$repo/tests/bench/gpu/buffers.py" --fit-params "$fit" --model "$dense" \
        --collections "$work/collections" --out "$out/buffers-llama3-8b.json" "${dense_configs[@]}"
      python3 "$repo/tests/bench/gpu/bench_llamacpp.py" --server "$server" --model "$small" \
        --out "$out/overhead-llama3.2-1b.json" --collections "$work/collections" --deadline "$deadline" \
        --n-predict 32 --levels 32 \
        --config "p32_c262144=--parallel 32 --ctx-size 262144 -kvu -fa on -b 512 -ub 512 --cache-ram 0" >/dev/null
      ;;
    advise|advise-dense)
      # A model that does not fit this GPU with the role's command line, and
      # every setting model_plan offers for it, served (tests/bench/gpu/advise.py).
      if [[ "$step" == advise ]]; then
        file="$(model gpt-oss-120b MXFP4 --fill sparse-experts)" name=gpt-oss-120b
      else
        file="$(model llama3-8b Q8_0)" name=llama3-8b
      fi
      python3 "$repo/tests/bench/gpu/advise.py" --server "$server" --model "$file" --name "$name" \
        --out "$out/advise-$name.json" --collections "$work/collections" --deadline "$deadline"
      ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
log "results in $out"
