"""Summarise a schemathesis run: cases per operation, phase and mode, and
exit 1 on any failure, error or warning. Reads the ndjson and json reports."""
import collections
import glob
import json
import sys

report = sys.argv[1]
cases = collections.Counter()
links = collections.Counter()
operations = set()
for line in open(glob.glob(f"{report}/*.ndjson")[0]):
    finished = json.loads(line).get("ScenarioFinished")
    if not finished:
        continue
    for case in finished["recorder"].get("cases", {}).values():
        value = case["value"]
        op = f"{value['method']} {value['path']}"  # the path template
        operations.add(op)
        cases[(op, value["meta"]["phase"]["name"], value["meta"]["generation"]["mode"])] += 1
        if "transition" in case:
            links[case["transition"]["id"]] += 1

# A method openapi.yaml does not declare for a path is only ever sent to be
# refused (405 with Allow): one line for all of them.
declared = {op for (op, _, mode) in cases if mode == "positive"}
undeclared = sorted(operations - declared)
operations = declared

phases = ["examples", "coverage", "fuzzing", "stateful"]
print(f"{'operation':<28}" + "".join(f"{p:>10}" for p in phases) + f"{'positive':>10}{'negative':>10}{'total':>8}")
for op in sorted(operations):
    by_phase = [sum(n for (o, p, _), n in cases.items() if o == op and p == ph) for ph in phases]
    pos = sum(n for (o, _, m), n in cases.items() if o == op and m == "positive")
    neg = sum(n for (o, _, m), n in cases.items() if o == op and m == "negative")
    print(f"{op:<28}" + "".join(f"{n:>10}" for n in by_phase) + f"{pos:>10}{neg:>10}{pos + neg:>8}")

if undeclared:
    paths = {op.split(" ", 1)[1] for op in undeclared}
    n = sum(v for (o, _, _), v in cases.items() if o in undeclared)
    print(f"undeclared methods, 405 expected: {n} cases ({len(undeclared)} method/path pairs over {len(paths)} paths)")
for link, n in sorted(links.items()):
    print(f"stateful: {n:>5} × {link}")

summary = json.load(open(glob.glob(f"{report}/*.json")[0]))
tc = summary["test_cases"]
warnings = {k: v for k, v in summary["warnings"].items() if v}
print(f"schemathesis {summary['schemathesis_version']}: {tc['generated']} cases, "
      f"{tc['with_failures']} with failures, {tc['errored']} errored, {len(warnings)} kinds of warning; "
      f"seed {summary['seed']}")
bad = tc["with_failures"] or tc["errored"] or summary["failures"] or summary["errors"] or warnings
if warnings:
    print("warnings:", json.dumps(warnings, indent=1))
sys.exit(1 if bad else 0)
