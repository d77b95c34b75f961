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

# Starts idemgate on its defaults with the in-process store, in front of
# http://127.0.0.1:9000 (override with ARGS="--upstream http://host:port").
run: build
	$(BUILD)/idemgate --store memory $(ARGS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

bench: build
	@bash scripts/deps.sh --bench
	bash bench/run.sh $(BUILD)/idemgate

fmt:
	clang-format -i $$(git ls-files '*.c' '*.h')

fmt-check:
	clang-format --dry-run -Werror $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) build-asan
