# Thin wrapper over CMake: make run | make test | make bench | make soak | make fmt
BUILD ?= build
JOBS ?= $(shell nproc)
ARGS ?=

.PHONY: all deps build run test bench soak fmt fmt-check clean
all: build

deps:
	@bash scripts/deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_ARGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

# The demo (scripts/run-demo.sh): a demo upstream, idemgate in front of it
# with the memory store, three curl commands to paste. UPSTREAM=http://host:port
# puts idemgate in front of a real API instead; STORE=redis uses (or starts) a
# local redis-server; ARGS adds idemgate flags.
# It builds the idemgate binary only (not the tests), its output shown only
# when the build fails.
run: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_ARGS) >/dev/null
	@echo "make run: building $(BUILD)/idemgate"
	@log=$$(mktemp) && if cmake --build $(BUILD) -j $(JOBS) --target idemgate >"$$log" 2>&1; \
	  then rm -f "$$log"; else cat "$$log"; rm -f "$$log"; exit 1; fi
	@UPSTREAM="$(UPSTREAM)" STORE="$(STORE)" bash scripts/run-demo.sh $(BUILD)/idemgate $(ARGS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

bench: build
	bash scripts/deps.sh --bench && bench/run $(BUILD)/idemgate

# Soak (not in CI, not in ctest): the exactly-once checker
# (tests/faults/exactly_once.py) for SOAK_SECONDS of mixed load with every
# fault, both instances' RSS sampled every 10 s; prints the RSS series and
# the checker's summary line, fails when the checker does.
SOAK_SECONDS ?= 600
SOAK_CLIENTS ?= 24
soak: build
	/usr/bin/python3 tests/faults/exactly_once.py --bin $(BUILD)/idemgate \
	  --duration $(SOAK_SECONDS) --clients $(SOAK_CLIENTS) --faults all --rss-interval 10

fmt:
	clang-format -i $$(git ls-files '*.c' '*.h')

fmt-check:
	clang-format --dry-run -Werror $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) build-asan
