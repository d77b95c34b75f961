/* fsm.c — the guard of every state machine (see fsm.h). Owns nothing: the
 * tables and names are the modules'. */
#include "idemgate/core/fsm.h"

#include <stdlib.h>

#include "idemgate/core/log.h"

void fsm_register(const struct fsm *m)
{
    metrics_state_names(m->gauge, m->states, m->n_states);
}

static const char *fsm_state(const struct fsm *m, int s)
{
    return s >= 0 && s < m->n_states ? m->states[s] : "unknown";
}

int fsm_next(const struct fsm *m, int from, int to)
{
    if (from < 0 || from >= m->n_states || to < 0 || to >= m->n_states ||
        !(m->transitions[from] & (1u << to))) {
        log_msg(LOG_ERROR, "illegal %s transition %s -> %s", m->name, fsm_state(m, from),
                fsm_state(m, to));
        abort();
    }
    metrics_state_move(m->gauge, from, to);
    return to;
}

void fsm_enter(const struct fsm *m, int to)
{
    metrics_state_move(m->gauge, -1, to);
}

void fsm_leave(const struct fsm *m, int from)
{
    metrics_state_move(m->gauge, from, -1);
}
