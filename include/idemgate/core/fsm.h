/* fsm.h — the one guard of every state machine (as pgbouncer's
 * change_client_state is for its clients): a machine is its state names and
 * its transition table (from -> bitmask of legal to), both kept by the
 * module that owns the machine, next to its STATES_*(X) list, in its own
 * header; every change goes through fsm_next, which checks it and keeps the
 * machine's per-state gauge (a METRICS_GAUGE_SETS row) in step. A new
 * state machine is a list, a table and a struct fsm in its module: nothing
 * here changes.
 *
 * Illegal transitions are logged and abort, in release builds too: a
 * state machine that went wrong is a double execution waiting to happen.
 * Tables and names are static data; fsm_register runs at start. */
#ifndef IDEMGATE_CORE_FSM_H
#define IDEMGATE_CORE_FSM_H

#include "idemgate/core/metrics.h"

struct fsm {
    const char *name;            /* "exchange": in the abort message */
    const char *const *states;   /* the names, by state (the gauge's label values) */
    int n_states;                /* at most METRICS_STATES_MAX */
    const unsigned *transitions; /* [from]: bitmask of the states `to` may be */
    enum metrics_gauge_set gauge;
};

/* Names the machine's states on its gauge; at start, before /metrics. */
void fsm_register(const struct fsm *m);
/* The one place an object of m changes state: returns to, or aborts when
 * m's table does not allow from -> to. */
int fsm_next(const struct fsm *m, int from, int to);
/* An object of m is created in state `to`, or freed from state `from`. */
void fsm_enter(const struct fsm *m, int to);
void fsm_leave(const struct fsm *m, int from);

#endif
