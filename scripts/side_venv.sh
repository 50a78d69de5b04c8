# Shared by the jobs that run in their own environment (compat.sh, lmms_eval.sh); sourced, not run.
# Before sourcing, set: venv (the venv folder), job (a short name for messages), need (what the job is, for the
# CI failure line) and skip (what is skipped elsewhere).
log="$venv/pip.log"
# Short network timeouts and one retry: an unreachable index fails in well under a minute instead of hanging.
net_opts=(--disable-pip-version-check --timeout 20 --retries 1)
pip_opts=(-q "${net_opts[@]}")

# No package index: under CI=true the job fails with one line; elsewhere it says so and is skipped.
no_index() {
    if [ "${CI:-}" = true ]; then
        echo "$job: cannot get $1 from the package index (see $log); $need needs it" >&2
        exit 1
    fi
    echo "$job: package index unreachable ($1, see $log); skipping $skip" >&2
    exit 0
}

# The package's own dependencies, read from pyproject.toml, into the array `deps`.
read_package_deps() {
    mapfile -t deps < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
}
