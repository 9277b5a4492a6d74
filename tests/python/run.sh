#!/usr/bin/env bash
# The official `openai` Python client against `kestrel serve` on the CPU.
# Installs openai + pytest into a venv under target/, starts the release
# binary on a free port, waits for /health, runs pytest, stops the server.
# Needs target/release/kestrel (cargo build --release -p kestrel-cli) and the
# default model (scripts/fetch-model.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=target/release/kestrel
[ -x "$bin" ] || { echo "run.sh: $bin not found: cargo build --release -p kestrel-cli" >&2; exit 1; }

venv=target/py-openai
if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check openai pytest
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
log=target/python-serve.log
"$bin" serve --port "$port" --device cpu --num-kv-blocks 256 --max-num-seqs 16 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "run.sh: the server exited early:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fsS "http://127.0.0.1:$port/health" >/dev/null || { echo "run.sh: no /health after 60 s" >&2; cat "$log" >&2; exit 1; }

KESTREL_BASE_URL="http://127.0.0.1:$port/v1" "$venv/bin/pytest" -q tests/python "$@"

# Raw SSE through curl: data lines, ending with `data: [DONE]`.
sse=$(curl -fsS -N "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"temperature":0,"stream":true}')
echo "$sse" | grep -q '^data: {.*"object":"chat.completion.chunk"' || { echo "run.sh: curl SSE lacks chunks:" >&2; echo "$sse" >&2; exit 1; }
[ "$(echo "$sse" | grep '^data: ' | tail -n 1)" = "data: [DONE]" ] || { echo "run.sh: curl SSE does not end with [DONE]:" >&2; echo "$sse" >&2; exit 1; }
echo "run.sh: curl SSE ok"

# The startup line names the address, the model, the device and the
# speculation (on by default: the tests above ran through it).
grep -q "listening on http://127.0.0.1:$port | model .* | device .* | speculation n-gram, up to 4 drafts" "$log" \
    || { echo "run.sh: no startup line with address, model, device and speculation:" >&2; cat "$log" >&2; exit 1; }

# Graceful shutdown: SIGINT stops accepting while a stream goes on; SIGTERM
# (a second signal) aborts it, which still ends it with [DONE]; the server
# exits with status 0.
long=target/python-serve-long.sse
curl -sS -N "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt":"Once upon a time","max_tokens":2000,"temperature":0,"ignore_eos":true,"stream":true}' >"$long" &
reader=$!
for _ in $(seq 1 100); do grep -q '^data: ' "$long" 2>/dev/null && break; sleep 0.1; done
grep -q '^data: ' "$long" || { echo "run.sh: the long stream never started" >&2; exit 1; }
kill -INT "$server"
sleep 1
kill -0 "$server" 2>/dev/null || { echo "run.sh: SIGINT did not wait for the stream in flight" >&2; cat "$log" >&2; exit 1; }
if curl -fsS --max-time 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
    echo "run.sh: new connections are still accepted after SIGINT" >&2; exit 1
fi
kill -TERM "$server"
status=0
for _ in $(seq 1 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
kill -0 "$server" 2>/dev/null && { echo "run.sh: the server did not exit within 10 s of SIGTERM" >&2; exit 1; }
wait "$server" || status=$?
wait "$reader" || true
[ "$status" -eq 0 ] || { echo "run.sh: the server exited with status $status" >&2; cat "$log" >&2; exit 1; }
[ "$(grep '^data: ' "$long" | tail -n 1)" = "data: [DONE]" ] || { echo "run.sh: the aborted stream lacks [DONE]" >&2; tail -n 3 "$long" >&2; exit 1; }
grep -q '"overloaded_error"' "$long" || { echo "run.sh: the aborted stream lacks its error event" >&2; exit 1; }
grep -q "shutting down" "$log" && grep -q "stopped" "$log" || { echo "run.sh: no shutdown lines in the log:" >&2; cat "$log" >&2; exit 1; }
echo "run.sh: SIGINT/SIGTERM shutdown ok"
