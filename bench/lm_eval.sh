#!/usr/bin/env bash
# lm-evaluation-harness against `openseek serve` (the bundled model) as it stands: a loglikelihood task through
# local-completions and a generation task through local-chat-completions, both with local data
# (bench/lm_eval_tasks). It starts the server, runs both, and stops the server; what lm_eval prints goes to
# stdout, its logs to $LOG_DIR. lm-eval is a client only and lives in its own venv, not openseek's dependencies:
#   python -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install "lm-eval[api]" transformers
# usage: bench/lm_eval.sh > bench/results/lm_eval.txt     (LM_EVAL=path/to/lm_eval PORT=8765 to change)
set -euo pipefail
cd "$(dirname "$0")/.."
LM_EVAL=${LM_EVAL:-/tmp/lmeval-venv/bin/lm_eval}
PORT=${PORT:-8765}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # everything is local

PYTHONPATH=$PWD python -m openseek serve --port "$PORT" > "$LOG_DIR/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 "$SERVER" || { cat "$LOG_DIR/server.log" >&2; exit 1; }
    sleep 1
done

run() {  # echo the command, then what it prints; its logs and progress bars to a file
    echo "\$ $*"
    local start=$SECONDS
    "$@" 2>> "$LOG_DIR/lm_eval.log"
    echo "($((SECONDS - start)) s)"
    echo
}

# the server's model id is openseek-demo (GET /v1/models); the bundled folder holds the tokenizer lm-eval uses to
# count context tokens, and prompts go as token ids (lm-eval's default, tokenized_requests=True)
run "$LM_EVAL" --model local-completions \
    --model_args "base_url=http://127.0.0.1:$PORT/v1/completions,model=openseek-demo,tokenizer=openseek/bundled,tokenizer_backend=huggingface,max_length=2048" \
    --batch_size 8 --include_path bench/lm_eval_tasks --tasks python_syntax_mc
run "$LM_EVAL" --model local-chat-completions \
    --model_args "base_url=http://127.0.0.1:$PORT/v1/chat/completions,model=openseek-demo,num_concurrent=8" \
    --apply_chat_template --include_path bench/lm_eval_tasks --tasks python_def_gen
