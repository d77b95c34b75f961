/* fuzz_check.h — the fuzz targets' invariant check: CHECK(cond) names the
 * file, line and condition on stderr, then aborts (libFuzzer saves the
 * input). */
#ifndef IDEMGATE_FUZZ_CHECK_H
#define IDEMGATE_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
