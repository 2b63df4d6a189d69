#!/usr/bin/env python3
"""Measure llama.cpp on the GGUF model Colony runs in process, for a side-by-side
comparison with Colony's embedded engine. A bench step, not a product dependency:
run it with the python of the venv that scripts/llamacpp-venv.sh makes.

  llamacpp_bench.py --model PATH --threads 2 --max-tokens 63 --runs 3 --prompt-file FILE

The prompt file holds an already-templated raw prompt (ChatML with special tokens).
Each run starts from an empty KV cache, evaluates the prompt in one timed pass, then
decodes greedily one token at a time up to --max-tokens, stopping early only at an
end-of-generation token. A warm-up run comes first and is not counted. Prints one JSON
object on stdout (medians over the runs); everything else goes to stderr.
"""
import argparse
import json
import os
import statistics
import sys
import time

import llama_cpp
import numpy as np


def log(*args):
    print("llamacpp-bench:", *args, file=sys.stderr)


def greedy(llm):
    # eval() leaves only the last position's logits in the context (logits_all=False).
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def run_once(llm, prompt_tokens, max_tokens, is_eog):
    llm.reset()
    llm._ctx.kv_cache_clear()  # a fresh KV cache, not only a rewound position
    start = time.perf_counter()
    llm.eval(prompt_tokens)
    prompt_s = time.perf_counter() - start

    generated = []
    start = time.perf_counter()
    while len(generated) < max_tokens:
        token = greedy(llm)
        if is_eog(token):
            break
        generated.append(token)
        if len(generated) == max_tokens:
            break
        llm.eval([token])
    gen_s = time.perf_counter() - start
    # N generated tokens cost N - 1 evals: the first token comes from the prompt's logits,
    # and the last one is not evaluated, as nothing follows it (Colony's engine does the same).
    return {
        "prompt_tokens_per_s": len(prompt_tokens) / prompt_s,
        "generation_tokens_per_s": len(generated) / gen_s if generated else 0.0,
        "generated_tokens": len(generated),
    }, generated


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=63)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-file", required=True)
    args = ap.parse_args()

    with open(args.prompt_file, encoding="utf-8") as f:
        prompt = f.read()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=2048,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def is_eog(token):
        return llama_cpp.llama_vocab_is_eog(vocab, token)

    # llama.cpp's OpenMP threads spin while waiting: on a busy machine, 2 threads
    # can be many times slower than on an idle one. The load says how busy it was.
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    log(f"llama_cpp {llama_cpp.__version__}, {len(prompt_tokens)} prompt tokens, load {load}, warm-up")
    run_once(llm, prompt_tokens, args.max_tokens, is_eog)
    runs = []
    for i in range(args.runs):
        result, generated = run_once(llm, prompt_tokens, args.max_tokens, is_eog)
        log(f"run {i + 1}: {json.dumps(result)}")
        runs.append(result)

    by_generation = sorted(runs, key=lambda r: r["generation_tokens_per_s"])
    print(json.dumps({
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "threads": args.threads,
        "prompt_tokens": len(prompt_tokens),
        "generated_tokens": by_generation[(len(runs) - 1) // 2]["generated_tokens"],
        "prompt_tokens_per_s": statistics.median(r["prompt_tokens_per_s"] for r in runs),
        "generation_tokens_per_s": statistics.median(r["generation_tokens_per_s"] for r in runs),
        "runs": runs,
        "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
    }))


if __name__ == "__main__":
    main()
