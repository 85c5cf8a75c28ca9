#!/usr/bin/env bash
# bitnet.cpp (microsoft/BitNet, I2_S) as a peer of `tritium bench model`: builds bitnet.cpp's llama.cpp fork with
# zig's clang, makes the bench model (LlamaForCausalLM 1024 wide, 8 blocks, FFN 2816, 16 heads, vocabulary 8192,
# tied head, torch.manual_seed(0), quantized and frozen with tritium.formats.gguf.PRESET), converts it to I2_S
# with the fork's llama-quantize, checks its greedy tokens against tritium's, and times it with the fork's
# llama-bench next to upstream llama.cpp's llama-bench on tritium's TQ2_0 export of the same model.
#
# What it does, in order (each step is skipped when its output is there, so reruns only re-time):
#   1. a scratch venv ($WORK/venv) with the `ziglang` wheel; $WORK/bin/zig-{cc,c++,ar,ranlib} call its clang
#      (bitnet.cpp wants clang; the machine has none, zig's is clang 22 with its own libc++);
#   2. the source tree $WORK/src/BitNet from BITNET_SRC with LLAMA_FORK_SRC as 3rdparty/llama.cpp (each a bare
#      git dir, checked out at BITNET_COMMIT / LLAMA_FORK_COMMIT, or a plain directory, copied);
#   3. cmake + ninja as bitnet.cpp's setup_env.py does for i2_s on x86 (-DBITNET_X86_TL2=OFF), static libraries
#      (with shared ones zig links a libc++ into each .so and the executable, and llama-bench segfaults in
#      llama_model_load's ostringstream), targets llama-quantize, llama-bench, llama-cli, plus bitnet-greedy (a
#      small program on the fork's API, written below: greedy decoding / teacher-forced logits on token ids).
#      include/bitnet-lut-kernels.h is a stub: it holds only the TL1/TL2 LUT kernels (setup_env.py's codegen),
#      which an I2_S build does not compile (the I2_S kernels are src/ggml-bitnet-mad.cpp). Log: $WORK/logs.
#   4. with tritium's venv: the model, tritium's 64 greedy tokens for the bench prompt (16 ids,
#      torch.Generator().manual_seed(1)), teacher-forced logits on the 128-id bench prompt, TQ2_0 GGUFs
#      (tritium.export, embedding/tied head in F32 = tritium's default, and in F16), upstream llama.cpp's
#      (llama-cpp-python) greedy tokens and logits on the TQ2_0 file, and an F32 GGUF for the fork whose
#      ternary layers are the TQ2_0 layers dequantized (codes x the tensor's one scale, fp16-rounded as in
#      TQ2_0; I2_S keeps one float scale per tensor = max|w|, so the codes and scale carry over exactly);
#   5. llama-quantize fork-f32.gguf i2_s-*.gguf I2_S 1 (1 thread, as setup_env.py: the I2_S quantizer takes the
#      scale over the rows of one call), once with the head in F32 (--output-tensor-type/--token-embedding-type
#      f32, to match the TQ2_0 file) and once in F16 (bitnet.cpp's default for I2_S);
#   6. token check: greedy tokens and teacher-forced top-1/cosine of bitnet.cpp I2_S vs tritium (and upstream
#      TQ2_0 vs tritium);
#   7. timings, ROUNDS rounds, each: the fork's llama-bench on the two I2_S files, then upstream llama-bench on
#      the two TQ2_0 files, each `-p 16 -n 64 -t THREADS -r REPS` and `-p 128 -n 0 -t THREADS -r REPS`.
#
# Requirements: bash, git, cmake >= 3.14, ninja, python3 with venv and a package index that has `ziglang`;
# tritium's venv (TRITIUM_PYTHON, default <repo>/.venv/bin/python) with torch, transformers, gguf and
# llama-cpp-python; an upstream llama.cpp llama-bench (UPSTREAM_LLAMA_BENCH, default
# $PEERS_DIR/llama.cpp-build/bin/llama-bench; skipped with a note when absent); the sources, fetched beforehand
# (no network is used here except pip for ziglang):
#   BITNET_SRC      microsoft/BitNet             (default /work/.mirror/microsoft+BitNet/repo)
#   LLAMA_FORK_SRC  its 3rdparty/llama.cpp fork  (default /work/.mirror/Eddie-Wang1120+llama.cpp/repo)
#   BITNET_COMMIT / LLAMA_FORK_COMMIT: the newest pair available there, BitNet 4645960 (2024-11-08) whose
#   submodule is Eddie-Wang1120/llama.cpp 406a503 (merge-dev, 2024-10-18). BitNet's later commits pin fork
#   commits that the snapshot lacks (and, since 2026-07, isHuangXin/llama.cpp), so they cannot be built here.
#
# Output: the tables go to $PEERS_DIR/results/bitnetcpp-<UTC time>.txt (and the raw llama-bench JSON and token
# check to the .json / directory of the same name); PEERS_DIR defaults to /tmp/peers. Work files (venv, build,
# GGUF files) are under WORK (default /tmp/bitnet). Other settings: THREADS (thread counts to time, "2 1"), REPS
# (5), ROUNDS (2). The 1-thread rows are a control: on a 2-core machine that is running something else (even at
# nice 19), 2 threads that wait on each other at every op's barrier (the fork's spin/poll threadpool, upstream's
# OpenMP) give erratic samples (tg64 from ~1 to ~120 tok/s in one llama-bench run); 1 thread does not.
#
# Usage: scripts/peer_bitnetcpp.sh            # or BITNET_SRC=... LLAMA_FORK_SRC=... scripts/peer_bitnetcpp.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
WORK=${WORK:-/tmp/bitnet}
BITNET_SRC=${BITNET_SRC:-/work/.mirror/microsoft+BitNet/repo}
LLAMA_FORK_SRC=${LLAMA_FORK_SRC:-/work/.mirror/Eddie-Wang1120+llama.cpp/repo}
BITNET_COMMIT=${BITNET_COMMIT:-4645960add917c8284ad05eebedca31f8848d45d}
LLAMA_FORK_COMMIT=${LLAMA_FORK_COMMIT:-406a5036f9a8aaee9ec5e96e652f61691340fe95}
TRITIUM_PYTHON=${TRITIUM_PYTHON:-$here/../.venv/bin/python}
UPSTREAM_LLAMA_BENCH=${UPSTREAM_LLAMA_BENCH:-$PEERS_DIR/llama.cpp-build/bin/llama-bench}
THREADS=${THREADS:-2 1}
THREADS1=${THREADS%% *}
REPS=${REPS:-5}
ROUNDS=${ROUNDS:-2}
ZIGLANG=${ZIGLANG:-ziglang==0.17.1}

stamp=$(date -u +%Y%m%d-%H%M%S)
RESULTS=$PEERS_DIR/results
OUTDIR=$RESULTS/bitnetcpp-$stamp
mkdir -p "$WORK/logs" "$WORK/bin" "$WORK/gen" "$WORK/model" "$OUTDIR"
log() { echo "[peer_bitnetcpp $(date -u +%H:%M:%S)] $*" >&2; }

# 1. zig's clang in a scratch venv
if [ ! -x "$WORK/venv/bin/python" ] || ! "$WORK/venv/bin/python" -m ziglang version >/dev/null 2>&1; then
    log "venv with $ZIGLANG"
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q "$ZIGLANG"
fi
for t in cc c++ ar ranlib; do
    printf '#!/bin/sh\nexec %q -m ziglang %s "$@"\n' "$WORK/venv/bin/python" "$t" > "$WORK/bin/zig-$t"
    chmod +x "$WORK/bin/zig-$t"
done

# 2. sources
place() {  # place SRC COMMIT DEST: a git dir checked out at COMMIT, or a directory copied
    local src=$1 commit=$2 dest=$3
    mkdir -p "$dest"
    if [ -f "$src/HEAD" ] && [ -d "$src/objects" ]; then
        # the snapshot lacks a few large blobs (llama.cpp's models/ggml-vocab-*.gguf), which the build does not use
        git --git-dir="$src" --work-tree="$dest" checkout "$commit" -- . ':(exclude)models/*.gguf' ':(exclude)3rdparty/llama.cpp'
    elif [ -d "$src" ]; then
        (cd "$src" && tar --exclude=.git -cf - .) | (cd "$dest" && tar -xf -)
    else
        echo "peer_bitnetcpp: source $src not found (fetch it first)" >&2; exit 2
    fi
}
tree=$WORK/src/BitNet
want="$BITNET_SRC@$BITNET_COMMIT $LLAMA_FORK_SRC@$LLAMA_FORK_COMMIT"
if [ "$(cat "$WORK/src/.placed" 2>/dev/null)" != "$want" ]; then
    log "sources: BitNet $BITNET_COMMIT, llama.cpp fork $LLAMA_FORK_COMMIT"
    rm -rf "$WORK/src" "$WORK/build"
    place "$BITNET_SRC" "$BITNET_COMMIT" "$tree"
    place "$LLAMA_FORK_SRC" "$LLAMA_FORK_COMMIT" "$tree/3rdparty/llama.cpp"
    if [ -f "$BITNET_SRC/HEAD" ]; then
        pinned=$(git --git-dir="$BITNET_SRC" ls-tree "$BITNET_COMMIT" 3rdparty/llama.cpp | awk '{print $3}')
        [ "$pinned" = "$LLAMA_FORK_COMMIT" ] || log "WARNING: BitNet $BITNET_COMMIT pins llama.cpp $pinned, not $LLAMA_FORK_COMMIT"
    fi
    if [ ! -f "$tree/include/bitnet-lut-kernels.h" ]; then
        printf '%s\n' '// stub written by tritium scripts/peer_bitnetcpp.sh: the TL1/TL2 LUT kernels of setup_env.py'"'"'s codegen' \
            '// are compiled only with BITNET_ARM_TL1 / BITNET_X86_TL2; the I2_S build (TL2 OFF) does not use them.' \
            '#pragma once' > "$tree/include/bitnet-lut-kernels.h"
    fi
    echo "$want" > "$WORK/src/.placed"
fi

# 3. build (static: see the header)
B=$WORK/build
cat > "$WORK/gen/bitnet-greedy.cpp" <<'EOF'
// Greedy decoding on token ids with bitnet.cpp's llama.cpp fork (its Oct 2024 API): prints the n_gen generated ids.
// With --logits FILE, n_gen must be 0: the ids are fed one at a time (the decode path, teacher-forced) and the
// float32 logits after each are written to FILE (n_ids x n_vocab).
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
int main(int argc, char ** argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s model.gguf threads n_gen [--logits FILE] id...\n", argv[0]); return 2; }
    const int threads = atoi(argv[2]), n_gen = atoi(argv[3]);
    int first = 4;
    const char * logits_path = nullptr;
    if (std::string(argv[4]) == "--logits") { logits_path = argv[5]; first = 6; }
    std::vector<llama_token> prompt;
    for (int i = first; i < argc; i++) prompt.push_back(atoi(argv[i]));
    llama_backend_init();
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_model * model = llama_load_model_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 256; cp.n_threads = threads; cp.n_threads_batch = threads;
    llama_context * ctx = llama_new_context_with_model(model, cp);
    const int n_vocab = llama_n_vocab(model);
    int pos = 0;
    if (logits_path) {
        FILE * f = fopen(logits_path, "wb");
        for (llama_token t : prompt) {
            if (llama_decode(ctx, llama_batch_get_one(&t, 1, pos++, 0))) return 1;
            fwrite(llama_get_logits_ith(ctx, -1), sizeof(float), n_vocab, f);
        }
        fclose(f);
        return 0;
    }
    if (llama_decode(ctx, llama_batch_get_one(prompt.data(), (int) prompt.size(), pos, 0))) return 1;
    pos += (int) prompt.size();
    for (int t = 0; t < n_gen; t++) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
        printf(t ? " %d" : "%d", best);
        if (llama_decode(ctx, llama_batch_get_one(&best, 1, pos++, 0))) return 1;
    }
    printf("\n");
    llama_free(ctx); llama_free_model(model); llama_backend_free();
    return 0;
}
EOF
if [ ! -x "$B/bin/llama-bench" ] || [ ! -x "$B/bin/llama-quantize" ] || [ ! -x "$B/bin/llama-cli" ]; then
    log "build (log: $WORK/logs/build.log)"
    nice -n 5 cmake -S "$tree" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBITNET_X86_TL2=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF \
        -DCMAKE_C_COMPILER="$WORK/bin/zig-cc" -DCMAKE_CXX_COMPILER="$WORK/bin/zig-c++" \
        -DCMAKE_AR="$WORK/bin/zig-ar" -DCMAKE_RANLIB="$WORK/bin/zig-ranlib" > "$WORK/logs/configure.log" 2>&1 \
        || { tail -30 "$WORK/logs/configure.log" >&2; exit 1; }
    nice -n 5 cmake --build "$B" -j "$(nproc)" --target llama-quantize llama-bench llama-cli > "$WORK/logs/build.log" 2>&1 \
        || { grep -n -B2 -A8 'error' "$WORK/logs/build.log" | head -60 >&2; exit 1; }
fi
if [ ! -x "$B/bin/bitnet-greedy" ] || [ "$WORK/gen/bitnet-greedy.cpp" -nt "$B/bin/bitnet-greedy" ]; then
    L=$tree/3rdparty/llama.cpp
    nice -n 5 "$WORK/bin/zig-c++" -O2 -std=c++17 -I"$L/include" -I"$L/ggml/include" "$WORK/gen/bitnet-greedy.cpp" \
        -o "$B/bin/bitnet-greedy" "$B/3rdparty/llama.cpp/src/libllama.a" "$B/3rdparty/llama.cpp/ggml/src/libggml.a" -lpthread
fi

# 4. the model, tritium's tokens and logits, TQ2_0 files, upstream llama.cpp's tokens, the F32 file for the fork
M=$WORK/model
cat > "$WORK/gen/prep.py" <<'EOF'
"""The `tritium bench model` PRESET model: tritium's greedy tokens and teacher-forced logits, TQ2_0 GGUFs for
upstream llama.cpp (and its tokens/logits via llama-cpp-python), an F32 GGUF for bitnet.cpp's llama-quantize."""
import json
import os
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gguf
import llama_cpp
import tritium
from tritium.bench.model import _generate, _llamacpp_generate, _prompt
from tritium.formats.gguf import PRESET

out, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
                  tie_word_embeddings=True)
torch.manual_seed(0)
model = tritium.freeze(tritium.quantize(LlamaForCausalLM(cfg).eval(), PRESET))
prompt = _prompt(cfg.vocab_size)  # torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(1))
forced = _prompt(cfg.vocab_size, 128)[0]  # the 128-id prompt of bench model's prefill128
_, _, ref = _generate(model, prompt, 64)
with torch.inference_mode():
    np.save(f"{out}/tritium-forced.npy", model(input_ids=forced[None]).logits[0].float().numpy())
for ft in ("f32", "f16"):  # embedding / tied head in F32 (tritium's default) or F16
    tritium.export(model, f"{out}/tq2_0-{ft}.gguf", qtype="tq2_0", float_type=ft)

# F32 GGUF for the fork: TQ2_0 layers dequantized (codes x the tensor's one fp16-rounded scale), the rest as is;
# the fork (llama.cpp of Oct 2024) calls a vocabulary-less file "no_vocab" (later llama.cpp: "none")
r = gguf.GGUFReader(f"{out}/tq2_0-f32.gguf")
w = gguf.GGUFWriter(f"{out}/fork-f32.gguf.tmp", r.fields["general.architecture"].contents())
for name, f in r.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    if name == "general.file_type":
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
    elif name == "tokenizer.ggml.model":
        w.add_tokenizer_model("no_vocab")
    else:
        vt = f.types[0]
        w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
scales = {}
for t in r.tensors:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    if t.tensor_type != gguf.GGMLQuantizationType.F32:
        scales[t.name] = np.unique(np.abs(a[a != 0]))  # must be one number: I2_S keeps one scale per tensor
    w.add_tensor(t.name, np.ascontiguousarray(a))
bad = {k: len(v) for k, v in scales.items() if len(v) != 1}
assert not bad, f"ternary tensors with more than one scale: {bad}"
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
os.replace(f"{out}/fork-f32.gguf.tmp", f"{out}/fork-f32.gguf")

llm = llama_cpp.Llama(model_path=f"{out}/tq2_0-f32.gguf", n_threads=threads, n_threads_batch=threads, n_ctx=256,
                      n_batch=128, verbose=False)
_, _, tq2 = _llamacpp_generate(llm, prompt[0].tolist(), 64)
llm.reset()
rows = []
for t in forced.tolist():  # one id at a time, as bitnet-greedy --logits does
    llm.eval([t])
    rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(cfg.vocab_size,)).copy())
np.save(f"{out}/tq2_0-f32-forced.npy", np.stack(rows))
json.dump({"prompt": prompt[0].tolist(), "forced": forced.tolist(), "tritium": ref, "llamacpp_tq2_0_f32": tq2,
           "ternary_tensors": len(scales)}, open(f"{out}/tokens.json", "w"))
print(f"prep: {len(scales)} ternary tensors, one scale each; upstream TQ2_0 greedy tokens",
      "match tritium's" if tq2 == ref else "DIFFER from tritium's")
EOF
if [ ! -s "$M/tokens.json" ] || [ ! -s "$M/fork-f32.gguf" ]; then
    log "model, tritium tokens, TQ2_0 export, F32 file for the fork"
    nice -n 5 "$TRITIUM_PYTHON" "$WORK/gen/prep.py" "$M" "$THREADS1" 2>&1 | tee "$WORK/logs/prep.log"
fi

# 5. I2_S
for head in f32 f16; do
    if [ ! -s "$M/i2_s-$head.gguf" ]; then
        log "llama-quantize I2_S (head $head)"
        extra=(); [ "$head" = f32 ] && extra=(--output-tensor-type f32 --token-embedding-type f32)
        "$B/bin/llama-quantize" "${extra[@]}" "$M/fork-f32.gguf" "$M/i2_s-$head.gguf.tmp" I2_S 1 \
            > "$WORK/logs/quantize-$head.log" 2>&1 || { tail -20 "$WORK/logs/quantize-$head.log" >&2; exit 1; }
        mv "$M/i2_s-$head.gguf.tmp" "$M/i2_s-$head.gguf"
    fi
done

# 6. token check
read -r -a prompt_ids < <("$TRITIUM_PYTHON" -c "import json; print(*json.load(open('$M/tokens.json'))['prompt'])")
read -r -a forced_ids < <("$TRITIUM_PYTHON" -c "import json; print(*json.load(open('$M/tokens.json'))['forced'])")
for head in f32 f16; do
    "$B/bin/bitnet-greedy" "$M/i2_s-$head.gguf" "$THREADS1" 64 "${prompt_ids[@]}" > "$OUTDIR/i2_s-$head.tokens"
    "$B/bin/bitnet-greedy" "$M/i2_s-$head.gguf" "$THREADS1" 0 --logits "$OUTDIR/i2_s-$head-forced.f32" "${forced_ids[@]}"
done
"$TRITIUM_PYTHON" - "$M" "$OUTDIR" > "$OUTDIR/tokens.txt" <<'EOF'
import json, sys
import numpy as np
m, out = sys.argv[1:]
d = json.load(open(f"{m}/tokens.json"))
ref, t_ref = d["tritium"], np.load(f"{m}/tritium-forced.npy")
def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
def forced(lg):
    cos = (lg * t_ref).sum(1) / np.linalg.norm(lg, axis=1) / np.linalg.norm(t_ref, axis=1)
    return f"top-1 {100 * (lg.argmax(1) == t_ref.argmax(1)).mean():.1f}%, cosine min {cos.min():.5f} mean {cos.mean():.5f}"
rows = [("upstream llama.cpp TQ2_0 (head F32)", d["llamacpp_tq2_0_f32"], np.load(f"{m}/tq2_0-f32-forced.npy"))]
for head in ("f32", "f16"):
    rows.append((f"bitnet.cpp I2_S (head {head.upper()})", [int(x) for x in open(f"{out}/i2_s-{head}.tokens").read().split()],
                 np.fromfile(f"{out}/i2_s-{head}-forced.f32", dtype=np.float32).reshape(len(d["forced"]), -1)))
print(f"TOKENS: greedy, 16-id prompt (seed 1) + 64 tokens, vs tritium (PRESET model, frozen); tritium: {ref}")
print(f"teacher-forced: the 128-id prompt fed one id at a time (the decode path), logits vs tritium's full forward")
for name, toks, lg in rows:
    fd = first_diff(toks, ref)
    print(f"  {name:36s} greedy {'identical (64/64)' if fd is None and len(toks) == len(ref) else f'differ from token {fd}'}; "
          f"forced {forced(lg)}")
json.dump({name: {"tokens": toks, "identical": toks == ref} for name, toks, _ in rows} | {"tritium": ref},
          open(f"{out}/tokens.json", "w"))
EOF
cat "$OUTDIR/tokens.txt"

# 7. timings
if [ -x "$UPSTREAM_LLAMA_BENCH" ]; then upstream=1; else upstream=0; log "no upstream llama-bench at $UPSTREAM_LLAMA_BENCH: TQ2_0 skipped"; fi
for round in $(seq 1 "$ROUNDS"); do
    log "timing round $round/$ROUNDS"
    for t in $THREADS; do
    for args in "-p 16 -n 64" "-p 128 -n 0"; do
        tag=r$round-t$t-$(echo "$args" | tr -d ' -')
        "$B/bin/llama-bench" -m "$M/i2_s-f32.gguf" -m "$M/i2_s-f16.gguf" $args -t "$t" -r "$REPS" -o json \
            > "$OUTDIR/bitnetcpp-$tag.json" 2> "$OUTDIR/bitnetcpp-$tag.err"
        if [ $upstream = 1 ]; then
            "$UPSTREAM_LLAMA_BENCH" -m "$M/tq2_0-f32.gguf" -m "$M/tq2_0-f16.gguf" $args -t "$t" -r "$REPS" -o json \
                > "$OUTDIR/upstream-$tag.json" 2> "$OUTDIR/upstream-$tag.err"
        fi
    done
    done
done

zig_clang=$("$WORK/bin/zig-cc" --version | head -1)
"$TRITIUM_PYTHON" - "$OUTDIR" "$M" "$stamp" "$THREADS" "$REPS" "$ROUNDS" "$BITNET_COMMIT" "$LLAMA_FORK_COMMIT" \
    "$UPSTREAM_LLAMA_BENCH" "$zig_clang" > "$RESULTS/bitnetcpp-$stamp.txt" <<'EOF'
import glob, json, os, platform, statistics, sys
out, m, stamp, threads, reps, rounds, bc, fc, up, zc = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
load = open("/proc/loadavg").read().split()[:3]
print(f"# scripts/peer_bitnetcpp.sh, {stamp} UTC, threads {threads}, {os.cpu_count()} cores: {cpu}; load average at the end {' '.join(load)}")
print(f"# bitnet.cpp: microsoft/BitNet {bc[:7]} + llama.cpp fork (Eddie-Wang1120/llama.cpp) {fc[:7]}, built with {zc}, "
      f"-DBITNET_X86_TL2=OFF, static, no OpenMP (zig's clang has none)")
ups = sorted(glob.glob(f"{out}/upstream-*.json"))
if ups:
    r0 = json.load(open(ups[0]))[0]
    print(f"# upstream llama.cpp: {up} (build {r0.get('build_number')}, commit {r0.get('build_commit')}; OpenMP if it was built so)")
else:
    print(f"# upstream llama.cpp: none ({up} missing)")
print(f"# model: tritium bench model shape (Llama 1024 x 8 blocks, FFN 2816, 16 heads, vocab 8192, tied head), "
      f"PRESET, frozen; llama-bench -r {reps}, {rounds} rounds (fork, upstream, fork, ...)")
print()
print(open(f"{out}/tokens.txt").read())
rows = {}
for path in sorted(glob.glob(f"{out}/*-r*.json")):
    engine = os.path.basename(path).split("-")[0]
    for r in json.load(open(path)):
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        key = (r["n_threads"], engine, os.path.basename(r["model_filename"]), test)
        rows.setdefault(key, []).extend(r["samples_ts"])
names = {"bitnetcpp": "bitnet.cpp", "upstream": "llama.cpp"}
print("TIMINGS: tokens/s (llama-bench samples_ts, median over all rounds x reps; min-max); file = GGUF on disk "
      "(head = embedding = output, F32 or F16)")
for nt in sorted({k[0] for k in rows}, reverse=True):
    print(f"-t {nt}")
    print(f"  {'engine':11s} {'file':15s} {'MiB':>6s} | {'pp16':>22s} {'pp128':>22s} {'tg64':>22s}")
    for eng in ("bitnetcpp", "upstream"):
        for f in sorted({k[2] for k in rows if k[:2] == (nt, eng)}):
            cells = []
            for test in ("pp16", "pp128", "tg64"):
                s = rows.get((nt, eng, f, test), [])
                cells.append(f"{statistics.median(s):8.1f} ({min(s):6.1f}-{max(s):6.1f})" if s else f"{'-':>22s}")
            mib = os.path.getsize(f"{m}/{f}") / 2**20
            print(f"  {names[eng]:11s} {f:15s} {mib:6.1f} | " + " ".join(cells))
    for fa, fb in (("i2_s-f32.gguf", "tq2_0-f32.gguf"), ("i2_s-f16.gguf", "tq2_0-f16.gguf")):
        parts = []
        for test in ("pp16", "pp128", "tg64"):
            a, b = rows.get((nt, "bitnetcpp", fa, test)), rows.get((nt, "upstream", fb, test))
            if a and b:
                parts.append(f"{test} {statistics.median(a) / statistics.median(b):.2f}x")
        if parts:
            print(f"  I2_S / TQ2_0 speed (medians), {fa} vs {fb}: " + ", ".join(parts))
    print()
print("I2_S's llama-bench 'model size' is over-reported (ggml counts I2_S as 1 byte per weight); MiB above is the file.")
print(f"raw llama-bench JSON and token files: {out}")
EOF
cat "$RESULTS/bitnetcpp-$stamp.txt"
