#!/bin/sh
# Token length and QR version, version 1 (an older cloudpdi binary) against version 2:
#   bench/token/run.sh [OLD_BINARY] [NEW_BINARY]
# Writes tokens and PNG slips (8 pixels per module, 4-module quiet zone) into a temp
# folder and prints characters, groups, QR modules and version for each.
set -eu
old=${1:-/work/cloudpdi-old}
new=${2:-target/release/cloudpdi}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
measure() { # name binary token-new-args...
    name=$1; bin=$2; shift 2
    "$bin" token new "$@" --out "$dir/$name.txt" >/dev/null
    "$bin" token slip "@$dir/$name.txt" --out "$dir/$name.png" --facility-name X >/dev/null
    text=$(cat "$dir/$name.txt")
    width=$(python3 -c "import struct,sys; print(struct.unpack('>I', open(sys.argv[1],'rb').read()[16:20])[0])" "$dir/$name.png")
    modules=$((width / 8 - 8))
    groups=$(printf %s "${text#HT?-}" | tr -cd - | wc -c)
    echo "$name: ${#text} characters, $((groups + 1)) groups, QR ${modules}x${modules} = version $(((modules - 17) / 4))-Q"
}
measure v1-daemon "$old" --repository http://127.0.0.1:11190 \
    --document-id 0123456789abcdef0123456789abcdef --facility HOSPITAL --summary "120 DICOM instances"
measure v1-shared "$old" --repository https://pdi.example.jp \
    --document-id 0123456789abcdef0123456789abcdef --facility HOSPA --summary "120 DICOM instances"
measure v2-LOCAL "$new" --community LOCAL --document-id 0123456789abcdef0123
measure v2-6-char-code "$new" --community ZZZZZZ --document-id 0123456789abcdef0123
measure v2-url "$new" --repository http://127.0.0.1:11190 --document-id 0123456789abcdef0123
measure v2-url-shared "$new" --repository https://pdi.example.jp --document-id 0123456789abcdef0123
