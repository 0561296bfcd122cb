#!/bin/sh
# Container entry point: check the environment, say loudly what the server is about to load, then
# become `csmserve serve`. csmserve reads every CSM_* variable itself (see the README's table), so they
# pass through unchanged; extra arguments are appended as flags.
#
#   (no arguments) or --flags      csmserve serve [--flags]
#   serve | say | make-tiny-model  csmserve <command> [...]
#   anything else                  run as given (e.g. `sh` to look around), without the checks
set -eu

log() { printf 'entrypoint: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

case "${1:-}" in
    "" | -*) set -- csmserve serve "$@" ;;
    serve | say | make-tiny-model) set -- csmserve "$@" ;;
    *) exec "$@" ;;
esac

# A directory the server must write to: created if missing, else a clear message about the volume.
writable_dir() {
    mkdir -p "$2" 2>/dev/null || true
    if [ ! -d "$2" ] || [ ! -w "$2" ]; then
        die "$1=$2 is not a writable directory for uid $(id -u): mount a volume there that this user can write (for a host directory: chown -R $(id -u) DIR)"
    fi
}

# --- settings that this script itself relies on -------------------------------------------------------
port=${CSM_PORT-8000}
case "$port" in
    "" | *[!0-9]*) die "CSM_PORT must be a port number from 1 to 65535, not '$port'" ;;
esac
if [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    die "CSM_PORT must be a port number from 1 to 65535, not '$port'"
fi

HF_HOME=${HF_HOME:-/data/hf}
export HF_HOME
writable_dir HF_HOME "$HF_HOME"
if [ -n "${CSM_OFFLINE_MODEL_DIR:-}" ]; then writable_dir CSM_OFFLINE_MODEL_DIR "$CSM_OFFLINE_MODEL_DIR"; fi
if [ -n "${CSM_AUDIO_DIR:-}" ]; then writable_dir CSM_AUDIO_DIR "$CSM_AUDIO_DIR"; fi
if [ -n "${CSM_VOICES_DIR:-}" ]; then writable_dir CSM_VOICES_DIR "$CSM_VOICES_DIR"; fi

# --- the Hugging Face token: HF_TOKEN, or a file (a Docker or compose secret) -------------------------
if [ -z "${HF_TOKEN:-}" ] && [ -n "${HF_TOKEN_FILE:-}" ]; then
    if [ ! -f "$HF_TOKEN_FILE" ] || [ ! -r "$HF_TOKEN_FILE" ]; then
        die "HF_TOKEN_FILE=$HF_TOKEN_FILE is not a readable file"
    fi
    HF_TOKEN=$(tr -d ' \r\n' <"$HF_TOKEN_FILE")
    [ -n "$HF_TOKEN" ] || die "HF_TOKEN_FILE=$HF_TOKEN_FILE is empty"
    export HF_TOKEN
fi
has_token=false
if [ -n "${HF_TOKEN:-}" ] || [ -n "${HUGGING_FACE_HUB_TOKEN:-}" ] || [ -s "$HF_HOME/token" ]; then
    has_token=true
fi

# --- what will be loaded --------------------------------------------------------------------------------
hub_cache=${HF_HUB_CACHE:-$HF_HOME/hub}
is_cached() {
    for config in "$hub_cache/models--$(printf '%s' "$1" | sed 's#/#--#g')"/snapshots/*/config.json; do
        [ -f "$config" ] && return 0
    done
    return 1
}

model=${CSM_MODEL:-sesame/csm-1b}
if [ "${CSM_ENGINE:-csm}" = fake ]; then
    log "engine: fake (a test tone, no model)"
elif [ "${CSM_MODEL:-}" = offline ]; then
    log "WARNING: CSM_MODEL=offline: the OFFLINE MODEL (random weights): ITS AUDIO IS NOISE."
elif [ -n "${CSM_MODEL:-}" ] && [ -d "$CSM_MODEL" ]; then
    log "model: local directory $CSM_MODEL"
elif [ "$has_token" = true ]; then
    log "model: $model (a Hugging Face token is set; cache in $hub_cache)"
elif is_cached "$model"; then
    log "model: $model from the cache in $hub_cache (no token)"
elif [ -n "${CSM_MODEL:-}" ]; then
    log "WARNING: no HF_TOKEN and $model is not in $hub_cache: if it is gated, loading will fail."
    log "WARNING: an explicit CSM_MODEL never falls back. Set HF_TOKEN, or mount a cache that has it."
else
    log "############################################################################################"
    log "WARNING: no HF_TOKEN and no cached $model in $hub_cache."
    log "WARNING: the server will start the OFFLINE MODEL (random weights): ITS AUDIO IS NOISE."
    log "WARNING: accept the licence at https://huggingface.co/sesame/csm-1b, create a read token,"
    log "WARNING: and start the container with -e HF_TOKEN=hf_... (or HF_TOKEN_FILE=/run/secrets/...)."
    log "############################################################################################"
fi

if [ "${CSM_DEVICE:-auto}" != cpu ] && [ ! -e /dev/nvidiactl ]; then
    log "WARNING: no NVIDIA GPU is visible in this container (no /dev/nvidiactl): start it with --gpus all"
    log "WARNING: (compose: the GPU reservation) and the NVIDIA Container Toolkit, or set CSM_DEVICE=cpu."
fi

# --- the settings in force, secrets hidden --------------------------------------------------------------
env | grep '^CSM_' | sort | while IFS='=' read -r name value; do
    case "$name" in
        *KEY* | *TOKEN* | *SECRET* | *PASSWORD*) value='***' ;;
    esac
    log "  $name=$value"
done
# Flags may carry secrets: name the command only.
log "starting: $1 $2"
exec "$@"
