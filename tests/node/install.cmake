# Installs the webhook test's signers (tests/node) into DST: copies
# package.json, package-lock.json and sign.mjs there and runs
# `npm ci --no-audit --no-fund` (the exact versions of the lock; nothing is
# written into the source tree). Run by the ctest fixture
# setup.webhook_signers (tests/CMakeLists.txt) and by test_webhook.py when
# run alone:
#   cmake -DSRC=tests/node -DDST=build/node -P tests/node/install.cmake
if(NOT SRC OR NOT DST)
  message(FATAL_ERROR "install.cmake: give -DSRC=<tests/node> -DDST=<dir>")
endif()
find_program(NPM npm)
if(NOT NPM)
  message(FATAL_ERROR "install.cmake: npm not found (scripts/deps.sh installs nodejs and npm)")
endif()
file(MAKE_DIRECTORY ${DST})
foreach(f package.json package-lock.json sign.mjs)
  file(COPY_FILE ${SRC}/${f} ${DST}/${f} ONLY_IF_DIFFERENT)
endforeach()
execute_process(COMMAND ${NPM} ci --no-audit --no-fund
                WORKING_DIRECTORY ${DST}
                RESULT_VARIABLE rc
                TIMEOUT 280)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "install.cmake: npm ci in ${DST} failed: ${rc}")
endif()
