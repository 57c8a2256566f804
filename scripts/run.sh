#!/usr/bin/env bash
# `make run`: start chatd on :8000 with a model behind it.
#  - an Ollama answering on 127.0.0.1:11434 is used as it is (its first model, unless
#    CHATD_MODEL names one);
#  - otherwise a real small model is started on loopback: llama.cpp's server (xllamacpp) with
#    SmolLM2-135M-Instruct, spoken to with the OpenAI API.
# State (config, SQLite file, control socket) lives in ./var. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
VAR=$PWD/var
PORT=${CHATD_PORT:-8000}
MODEL_PORT=${CHATD_MODEL_PORT:-8081}
mkdir -p "$VAR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if tags=$(curl -fsS --max-time 2 http://127.0.0.1:11434/api/tags 2>/dev/null); then
  model=${CHATD_MODEL:-$("$BIN/python" -c 'import json,sys; m=json.load(sys.stdin)["models"]; print(m[0]["name"] if m else "")' <<<"$tags")}
  [ -n "$model" ] || { echo "Ollama answers on 127.0.0.1:11434 but has no model: run 'ollama pull qwen2.5:0.5b'" >&2; exit 1; }
  backend='url = "http://127.0.0.1:11434"
api = "ollama"'
  echo "Using the Ollama on 127.0.0.1:11434, model $model"
else
  echo "No Ollama on 127.0.0.1:11434: starting a real small model (SmolLM2-135M, llama.cpp) on 127.0.0.1:$MODEL_PORT ..."
  fifo="$VAR/model.out"; rm -f "$fifo"; mkfifo "$fifo"
  "$BIN/chatd-local-model" --host 127.0.0.1 --port "$MODEL_PORT" >"$fifo" &
  pids+=($!)
  read -r line <"$fifo" || { echo "the local model did not start" >&2; exit 1; }
  cat "$fifo" >/dev/null &
  echo "$line"
  model=$(sed -n 's/.*(model: \(.*\)).*/\1/p' <<<"$line")
  backend="url = \"http://127.0.0.1:$MODEL_PORT\"
api = \"openai\""
fi

cat >"$VAR/chatd.toml" <<TOML
# Written by scripts/run.sh for \`make run\`; see etc/chatd/chatd.toml for every key.
[server]
bind = "0.0.0.0:$PORT"
workers = 2
graceful_timeout = 10.0

[control]
socket = "$VAR/control.sock"

[llm]
model = "$model"
first_token_timeout = 30.0

[[llm.backends]]
$backend
max_parallel = 2

[sessions]
store = "sqlite://$VAR/sessions.db"
TOML

cat <<MSG

chatd is starting on port $PORT (config: var/chatd.toml). To chat:
  in a terminal:  $BIN/chatd-chat ws://127.0.0.1:$PORT/ws
  in a browser:   http://127.0.0.1:$PORT/
  status:         $BIN/chatctl --socket var/control.sock status
Ctrl-C stops it.

MSG
"$BIN/chatd" --config "$VAR/chatd.toml" &
pids+=($!)
wait "${pids[-1]}"
