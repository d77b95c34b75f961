"""The exactly-once invariant: attempts held against the upstream's
execution log (the fault suite and the exactly-once checker).

Owns: SPEC_ERRORS (the answers idemgate may give a covered request while
things break, besides the upstream's own); Report (the numbers and the
first details); analyze(); assert_invariant().
"""

import collections

# docs/errors.md: the answers idemgate may give a covered request while
# things break, besides the upstream's own. (status, code).
SPEC_ERRORS = {(409, "request_in_progress"), (503, "store_unavailable"),
               (502, "upstream_unavailable"), (502, "upstream_answer_lost"),
               (504, "upstream_timeout")}


class Report:
    """What the attempts and the execution log say together. Definitions
    (the exactly-once checker's docstring says the same in more words):
      keys          keys some client sent (excluded ones included)
      requests      attempts made
      executions    upstream executions of those keys
      duplicates    keys (not excluded) executed more than once
      mismatched    2xx answers (and cut 2xx bodies) that are not, byte for
                    byte, the one execution of their key: another key's
                    execution, a body or X-Exec the log does not have, a
                    second execution's answer, or a second fresh (not
                    replayed) answer of one execution
      lost          keys (not excluded) whose clients never got a 2xx
      answer_lost   of those, keys answered 502 upstream_answer_lost
      unexpected    answers that are neither a 2xx nor a SPEC_ERRORS error
                    (or a replayed error other than answer_lost, or a lost
                    answer for a key that never executed), plus executions
                    of keys no client sent
      errors        the non-2xx endings by label (code or transport kind)
    """

    def __init__(self):
        self.keys = 0
        self.requests = 0
        self.executions = 0
        self.duplicates = 0
        self.mismatched = 0
        self.lost = 0
        self.answer_lost = 0
        self.unexpected = 0
        self.excluded = 0
        self.excluded_dups = 0
        self.errors = collections.Counter()
        self.details = []
        self.lost_keys = []

    def failed(self):
        return self.duplicates > 0 or self.mismatched > 0 or self.unexpected > 0

    def note(self, text):
        if len(self.details) < 40:
            self.details.append(text)

    def line(self):
        errs = ",".join("%s:%d" % kv for kv in sorted(self.errors.items()))
        return ("keys=%d requests=%d executions=%d duplicates=%d mismatched_replays=%d "
                "lost=%d answer_lost=%d unexpected=%d excluded=%d excluded_dups=%d errors=%s"
                % (self.keys, self.requests, self.executions, self.duplicates,
                   self.mismatched, self.lost, self.answer_lost, self.unexpected,
                   self.excluded, self.excluded_dups, errs or "-"))

    def explain(self):
        return self.line() + "\n" + "\n".join(self.details)


def _check_ok_answer(rep, a, execs_by_id):
    """Returns the execution id a 2xx (or cut 2xx) answer carries, or None
    after counting it as mismatched."""
    exec_id = a.header("X-Exec")
    ex = execs_by_id.get(exec_id)
    if ex is None or ex["key"] != a.key:
        rep.mismatched += 1
        rep.note("mismatch: %r carries X-Exec %r, not an execution of its key" % (a, exec_id))
        return None
    want = ex["body"].encode("latin-1")
    good = a.body == want if a.kind == "answer" else want.startswith(a.body)
    if not good:
        rep.mismatched += 1
        rep.note("mismatch: %r body differs from execution %s %r" % (a, exec_id, want))
        return None
    return exec_id


def analyze(attempts, execs, excluded=None):
    """Holds the attempts against the execution log. excluded: {key: reason}
    for keys a fault allows to execute again (Redis restarted empty, their
    owner instance killed): counted apart, their answers still checked
    against their own executions."""
    excluded = excluded or {}
    rep = Report()
    by_key = collections.defaultdict(list)
    for a in attempts:
        by_key[a.key].append(a)
    exec_by_key = collections.defaultdict(list)
    execs_by_id = {}
    for e in execs:
        exec_by_key[e["key"]].append(e)
        execs_by_id[e["exec"]] = e
    rep.keys = len(by_key)
    rep.requests = len(attempts)
    rep.excluded = sum(1 for k in by_key if k in excluded)
    for k, es in exec_by_key.items():
        if k not in by_key:
            rep.unexpected += 1
            rep.note("unexpected: %d execution(s) of key %r that no client sent" % (len(es), k))
    for key, atts in by_key.items():
        atts.sort(key=lambda a: a.t0)
        es = exec_by_key.get(key, [])
        rep.executions += len(es)
        if len(es) > 1:
            if key in excluded:
                rep.excluded_dups += 1
                rep.note("excluded (%s): key %r executed %d times" % (excluded[key], key, len(es)))
            else:
                rep.duplicates += 1
                rep.note("duplicate: key %r executed %d times: %s%s" % (
                    key, len(es), [(e["exec"], e["port"], e["mode"]) for e in es[:4]],
                    " ..." if len(es) > 4 else ""))
        first_id = None
        fresh = collections.Counter()
        got_ok = False
        for a in atts:
            if a.kind in ("answer", "cut") and a.status is not None and 200 <= a.status < 300:
                got_ok = got_ok or a.kind == "answer"
                exec_id = _check_ok_answer(rep, a, execs_by_id)
                if exec_id is None:
                    continue
                if a.kind == "cut":
                    rep.errors["cut"] += 1
                    continue
                if key not in excluded:
                    if first_id is None:
                        first_id = exec_id
                    elif exec_id != first_id:
                        rep.mismatched += 1
                        rep.note("mismatch: %r is execution %s, the key's first answer was %s"
                                 % (a, exec_id, first_id))
                    if not a.replayed:
                        fresh[exec_id] += 1
                        if fresh[exec_id] > 1:
                            rep.mismatched += 1
                            rep.note("mismatch: %r: execution %s answered fresh twice"
                                     % (a, exec_id))
                continue
            if a.kind != "answer":
                rep.errors[a.kind] += 1
                continue
            err = a.spec_error()
            rep.errors[a.code or str(a.status)] += 1
            if err not in SPEC_ERRORS:
                rep.unexpected += 1
                rep.note("unexpected: %r" % a)
            elif a.replayed and err != (502, "upstream_answer_lost"):
                rep.unexpected += 1
                rep.note("unexpected: replayed error %r" % a)
            elif err == (502, "upstream_answer_lost") and not es:
                rep.unexpected += 1
                rep.note("unexpected: %r lost, but the key never executed" % a)
        if key in excluded:
            continue
        if not got_ok:
            rep.lost += 1
            rep.lost_keys.append(key)
            if atts and atts[-1].spec_error() == (502, "upstream_answer_lost"):
                rep.answer_lost += 1
    return rep


def assert_invariant(rep):
    assert not rep.failed(), rep.explain()
