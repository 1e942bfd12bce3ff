#!/usr/bin/env bash
# Dependency hygiene (deny.toml): RustSec advisories, licenses, duplicate crates, sources.
#
# Installs cargo-deny when it is missing. The build machines cannot reach GitHub, so the
# advisories come from the snapshot committed in .ci/advisory-db (refresh it as
# docs/dependencies.md says): it is turned into the git checkout cargo-deny expects under
# target/advisory-db, with the snapshot's own date, so its age is checked honestly.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.20.2
if ! command -v cargo-deny >/dev/null || [ "$(cargo-deny --version)" != "cargo-deny $version" ]; then
    echo "installing cargo-deny $version"
    # A debug build: it compiles in half the time and checks this graph in a second.
    cargo install --quiet --locked --debug cargo-deny --version "$version"
fi

snapshot=.ci/advisory-db
date=$(sed -n 's/^date //p' "$snapshot/SNAPSHOT")
commit=$(sed -n 's/^commit //p' "$snapshot/SNAPSHOT")
# The folder name is cargo-deny's own for the db-urls entry of deny.toml.
db=target/advisory-db/advisory-db-3157b0e258782691
if [ "$(git -C "$db" log -1 --format=%s 2>/dev/null)" != "snapshot $commit" ]; then
    rm -rf "$db"
    mkdir -p "$db"
    cp -r "$snapshot/crates" "$db/"
    git -C "$db" init -q
    git -C "$db" add crates
    GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date git -C "$db" \
        -c user.name=cloudpdi -c user.email=ci@cloudpdi.invalid commit -q -m "snapshot $commit"
fi

# cargo-deny reads the crate graph of every target; fetch what a build here did not need.
cargo fetch --locked --quiet
cargo deny --offline --locked check
