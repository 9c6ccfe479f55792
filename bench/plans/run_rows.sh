#!/usr/bin/env bash
# Runs launch/compile.py once per line of rows.txt, one at a time; appends {"args", "rc", report} lines to $1.
# usage: bench/plans/run_rows.sh OUT.jsonl [ROWS_FILE]   (from the repository root, PYTHONPATH set)
out=$1; rows=${2:-bench/plans/rows.txt}
tmp=$(mktemp)
while IFS= read -r args; do
  [ -z "$args" ] && continue
  timeout ${ROW_TIMEOUT:-900} python launch/compile.py $args >"$tmp" 2>>"${out%.jsonl}.stderr"
  rc=$?
  python -c 'import json,sys; a,rc,p=sys.argv[1:]; l=(open(p).read().strip().splitlines() or [""])[-1]
try: r=json.loads(l)
except Exception: r={"unparsed": l}
print(json.dumps({"args": a, "rc": int(rc), **r}))' "$args" "$rc" "$tmp" >> "$out"
done < "$rows"
rm -f "$tmp"
