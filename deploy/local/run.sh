#!/usr/bin/env bash
# N `streamgen serve` replicas on loopback ports behind nginx (gRPC, least_conn); Ctrl-C or SIGTERM
# drains them all and stops nginx. The work is done by deploy/local/pool.py (see its docstring):
#
#   deploy/local/run.sh 3 -- --preset test --random-init --text-encoder hash
#   deploy/local/run.sh 2 --port 50050 --base-port 50061      # the committed default model
#   deploy/local/run.sh --help
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
# exec: signals sent to run.sh reach the supervisor, which drains the replicas.
exec "$python" "$repo/deploy/local/pool.py" "$@"
