# Thin wrapper over CMake: make run | make test | make bench | make fmt
BUILD ?= build
JOBS ?= $(shell nproc)
ARGS ?=

.PHONY: all deps build run test bench fmt fmt-check clean
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
run: build
	@UPSTREAM="$(UPSTREAM)" STORE="$(STORE)" bash scripts/run-demo.sh $(BUILD)/idemgate $(ARGS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

bench: build
	bash scripts/deps.sh --bench && bench/run $(BUILD)/idemgate

fmt:
	clang-format -i $$(git ls-files '*.c' '*.h')

fmt-check:
	clang-format --dry-run -Werror $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) build-asan
