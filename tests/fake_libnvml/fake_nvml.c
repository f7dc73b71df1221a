/*
 * A fake libnvidia-ml.so.1: the subset of the NVML C ABI that pynvml calls for wattson.
 *
 * Its GPUs, power profiles and faults come from a control file named by $FAKE_NVML_CONTROL that is
 * re-read on every call, so a test can change faults while the process under test runs. The format
 * is documented in README.md beside this file. Struct layouts and symbol names follow nvml.h as
 * mirrored by pynvml.py (nvidia-ml-py). Energy is the exact integral of the configured power profile,
 * so tests can predict every millijoule.
 */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

/* ---- ABI structs (nvml.h) ---------------------------------------------------------------------- */

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

#define NVML_MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

struct fake_device { int index; };
typedef struct fake_device *nvmlDevice_t;

/* ---- control file ------------------------------------------------------------------------------ */

#define MAX_GPUS 16
#define MAX_FN_ERRORS 8

enum profile { PROFILE_CONSTANT, PROFILE_SQUARE };

struct fn_error { char function[64]; int code; };

struct gpu_cfg {
    char uuid[96];
    char name[96];
    char pci_bus_id[32];
    int profile;
    double power_w, high_w, high_s, low_w, low_s;
    int energy_supported;
    double energy_origin;
    double power_limit_w;            /* < 0: not supported */
    unsigned long long memory_total, memory_used, memory_reserved;
    int memory_v2;
    int util_pct;                    /* < 0: not supported */
    int mig;                         /* 0 off, 1 on, -1 not supported */
    int error;                       /* every call on this GPU */
    struct fn_error fn_errors[MAX_FN_ERRORS];
    int n_fn_errors;
    long hang_ms;
};

struct cfg {
    int gpus;
    char driver_version[80];
    int gone;
    int gone_error;
    int init_error;
    int init_failures;
    int have_now;
    double now;
    struct gpu_cfg gpu[MAX_GPUS];
};

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static int refcount;        /* nvmlInit minus nvmlShutdown, like the real library */
static int init_attempts;   /* for init_failures: counted per process */
static struct fake_device devices[MAX_GPUS];

struct error_name { const char *name; int code; const char *text; };

static const struct error_name ERRORS[] = {
    {"success", NVML_SUCCESS, "Success"},
    {"uninitialized", NVML_ERROR_UNINITIALIZED, "Uninitialized"},
    {"invalid_argument", NVML_ERROR_INVALID_ARGUMENT, "Invalid Argument"},
    {"not_supported", NVML_ERROR_NOT_SUPPORTED, "Not Supported"},
    {"no_permission", NVML_ERROR_NO_PERMISSION, "Insufficient Permissions"},
    {"already_initialized", NVML_ERROR_ALREADY_INITIALIZED, "Already Initialized"},
    {"not_found", NVML_ERROR_NOT_FOUND, "Not Found"},
    {"insufficient_size", NVML_ERROR_INSUFFICIENT_SIZE, "Insufficient Size"},
    {"insufficient_power", NVML_ERROR_INSUFFICIENT_POWER, "Insufficient External Power"},
    {"driver_not_loaded", NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded"},
    {"timeout", NVML_ERROR_TIMEOUT, "Timeout"},
    {"irq_issue", NVML_ERROR_IRQ_ISSUE, "Interrupt Request Issue"},
    {"library_not_found", NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"},
    {"function_not_found", NVML_ERROR_FUNCTION_NOT_FOUND, "Function Not Found"},
    {"corrupted_inforom", NVML_ERROR_CORRUPTED_INFOROM, "Corrupted infoROM"},
    {"gpu_lost", NVML_ERROR_GPU_IS_LOST, "GPU is lost"},
    {"reset_required", NVML_ERROR_RESET_REQUIRED, "GPU requires restart"},
    {"operating_system", NVML_ERROR_OPERATING_SYSTEM, "The operating system has blocked the request."},
    {"lib_rm_version_mismatch", NVML_ERROR_LIB_RM_VERSION_MISMATCH,
     "RM has detected an NVML/RM version mismatch."},
    {"in_use", NVML_ERROR_IN_USE, "In use by another client"},
    {"memory", NVML_ERROR_MEMORY, "Insufficient Memory"},
    {"no_data", NVML_ERROR_NO_DATA, "No data"},
    {"argument_version_mismatch", NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
     "Struct version passed in does not match the version expected"},
    {"unknown", NVML_ERROR_UNKNOWN, "Unknown Error"},
};

static int parse_error_code(const char *value, int *code) {
    for (size_t i = 0; i < sizeof(ERRORS) / sizeof(ERRORS[0]); i++) {
        if (strcmp(value, ERRORS[i].name) == 0) {
            *code = ERRORS[i].code;
            return 0;
        }
    }
    char *end;
    long v = strtol(value, &end, 10);
    if (*value != '\0' && *end == '\0' && v >= 0) {
        *code = (int)v;
        return 0;
    }
    return -1;
}

static void gpu_defaults(struct gpu_cfg *g, int i) {
    memset(g, 0, sizeof(*g));
    snprintf(g->uuid, sizeof(g->uuid), "GPU-%08x-fa6e-4000-8000-%012x", (unsigned)i, (unsigned)i);
    snprintf(g->name, sizeof(g->name), "NVIDIA H100 80GB HBM3");
    snprintf(g->pci_bus_id, sizeof(g->pci_bus_id), "00000000:%02X:00.0", (unsigned)((0x18 + i * 0x10) & 0xFF));
    g->profile = PROFILE_CONSTANT;
    g->power_w = 300.0;
    g->high_w = 600.0; g->high_s = 2.0; g->low_w = 100.0; g->low_s = 1.0;
    g->energy_supported = 1;
    g->energy_origin = 1700000000.0;
    g->power_limit_w = 700.0;
    g->memory_total = 80ULL << 30;
    g->memory_used = 10ULL << 30;
    g->memory_reserved = 512ULL << 20;
    g->memory_v2 = 1;
    g->util_pct = 50;
    g->mig = 0;
    g->error = NVML_SUCCESS;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1])) *--end = '\0';
    return s;
}

static int parse_double(const char *v, double *out) {
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (*v == '\0' || *end != '\0' || errno) return -1;
    *out = d;
    return 0;
}

static int parse_ull(const char *v, unsigned long long *out) {
    char *end;
    errno = 0;
    unsigned long long u = strtoull(v, &end, 10);
    if (*v == '\0' || *end != '\0' || errno || *v == '-') return -1;
    *out = u;
    return 0;
}

static int parse_int(const char *v, int *out) {
    char *end;
    errno = 0;
    long l = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || errno) return -1;
    *out = (int)l;
    return 0;
}

static int copy_str(char *dst, size_t size, const char *v) {
    if (strlen(v) >= size) return -1;
    strcpy(dst, v);
    return 0;
}

/* One `gpu.<i>.<key>=<value>` setting. */
static int parse_gpu_key(struct gpu_cfg *g, const char *key, const char *v) {
    if (strcmp(key, "uuid") == 0) return copy_str(g->uuid, sizeof(g->uuid), v);
    if (strcmp(key, "name") == 0) return copy_str(g->name, sizeof(g->name), v);
    if (strcmp(key, "pci_bus_id") == 0) return copy_str(g->pci_bus_id, sizeof(g->pci_bus_id), v);
    if (strcmp(key, "profile") == 0) {
        if (strcmp(v, "constant") == 0) g->profile = PROFILE_CONSTANT;
        else if (strcmp(v, "square") == 0) g->profile = PROFILE_SQUARE;
        else return -1;
        return 0;
    }
    if (strcmp(key, "power_w") == 0) return parse_double(v, &g->power_w);
    if (strcmp(key, "high_w") == 0) return parse_double(v, &g->high_w);
    if (strcmp(key, "high_s") == 0) return parse_double(v, &g->high_s) || g->high_s <= 0 ? -1 : 0;
    if (strcmp(key, "low_w") == 0) return parse_double(v, &g->low_w);
    if (strcmp(key, "low_s") == 0) return parse_double(v, &g->low_s) || g->low_s <= 0 ? -1 : 0;
    if (strcmp(key, "energy") == 0) {
        if (strcmp(v, "supported") == 0) g->energy_supported = 1;
        else if (strcmp(v, "unsupported") == 0) g->energy_supported = 0;
        else return -1;
        return 0;
    }
    if (strcmp(key, "energy_origin") == 0) return parse_double(v, &g->energy_origin);
    if (strcmp(key, "power_limit_w") == 0) {
        if (strcmp(v, "unsupported") == 0) { g->power_limit_w = -1.0; return 0; }
        return parse_double(v, &g->power_limit_w) || g->power_limit_w < 0 ? -1 : 0;
    }
    if (strcmp(key, "memory_total") == 0) return parse_ull(v, &g->memory_total);
    if (strcmp(key, "memory_used") == 0) return parse_ull(v, &g->memory_used);
    if (strcmp(key, "memory_reserved") == 0) return parse_ull(v, &g->memory_reserved);
    if (strcmp(key, "memory_v2") == 0) return parse_int(v, &g->memory_v2);
    if (strcmp(key, "util_pct") == 0) {
        if (strcmp(v, "unsupported") == 0) { g->util_pct = -1; return 0; }
        return parse_int(v, &g->util_pct) || g->util_pct < 0 || g->util_pct > 100 ? -1 : 0;
    }
    if (strcmp(key, "mig") == 0) {
        if (strcmp(v, "unsupported") == 0) { g->mig = -1; return 0; }
        return parse_int(v, &g->mig) || (g->mig != 0 && g->mig != 1) ? -1 : 0;
    }
    if (strcmp(key, "error") == 0) return parse_error_code(v, &g->error);
    if (strncmp(key, "error.", 6) == 0) {
        if (g->n_fn_errors >= MAX_FN_ERRORS) return -1;
        struct fn_error *e = &g->fn_errors[g->n_fn_errors];
        if (copy_str(e->function, sizeof(e->function), key + 6) || parse_error_code(v, &e->code)) return -1;
        g->n_fn_errors++;
        return 0;
    }
    if (strcmp(key, "hang_ms") == 0) {
        int ms;
        if (parse_int(v, &ms) || ms < 0 || ms > 600000) return -1;
        g->hang_ms = ms;
        return 0;
    }
    return -1;
}

static int parse_key(struct cfg *c, const char *key, const char *v) {
    if (strcmp(key, "gpus") == 0) return parse_int(v, &c->gpus) || c->gpus < 0 || c->gpus > MAX_GPUS ? -1 : 0;
    if (strcmp(key, "driver_version") == 0) return copy_str(c->driver_version, sizeof(c->driver_version), v);
    if (strcmp(key, "driver") == 0) {
        if (strcmp(v, "loaded") == 0) c->gone = 0;
        else if (strcmp(v, "gone") == 0) c->gone = 1;
        else return -1;
        return 0;
    }
    if (strcmp(key, "gone_error") == 0) return parse_error_code(v, &c->gone_error);
    if (strcmp(key, "init_error") == 0) return parse_error_code(v, &c->init_error);
    if (strcmp(key, "init_failures") == 0) return parse_int(v, &c->init_failures);
    if (strcmp(key, "now") == 0) {
        c->have_now = 1;
        return parse_double(v, &c->now);
    }
    if (strncmp(key, "gpu.", 4) == 0) {
        char *end;
        long i = strtol(key + 4, &end, 10);
        if (end == key + 4 || *end != '.' || i < 0 || i >= MAX_GPUS) return -1;
        return parse_gpu_key(&c->gpu[i], end + 1, v);
    }
    return -1;
}

/* Read the control file; 0 on success, else prints one line to stderr and returns -1. */
static int load_cfg(struct cfg *c) {
    memset(c, 0, sizeof(*c));
    c->gpus = 1;
    snprintf(c->driver_version, sizeof(c->driver_version), "550.54.15");
    c->gone_error = NVML_ERROR_DRIVER_NOT_LOADED;
    for (int i = 0; i < MAX_GPUS; i++) gpu_defaults(&c->gpu[i], i);

    const char *path = getenv("FAKE_NVML_CONTROL");
    if (path == NULL || *path == '\0') return 0;
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "fake libnvidia-ml: cannot read control file %s (FAKE_NVML_CONTROL): %s\n", path,
                strerror(errno));
        return -1;
    }
    char line[512];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        lineno++;
        char *s = trim(line);
        if (*s == '\0' || *s == '#') continue;
        char *eq = strchr(s, '=');
        if (eq == NULL) {
            fprintf(stderr, "fake libnvidia-ml: %s:%d: expected key=value, got '%s'\n", path, lineno, s);
            rc = -1;
            break;
        }
        *eq = '\0';
        char *key = trim(s), *value = trim(eq + 1);
        if (parse_key(c, key, value) != 0) {
            fprintf(stderr, "fake libnvidia-ml: %s:%d: unknown key or bad value '%s=%s'\n", path, lineno, key,
                    value);
            rc = -1;
            break;
        }
    }
    fclose(f);
    return rc;
}

/* ---- time, power, energy ----------------------------------------------------------------------- */

static double now_s(const struct cfg *c) {
    if (c->have_now) return c->now;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double power_at(const struct gpu_cfg *g, double t) {
    if (g->profile == PROFILE_CONSTANT) return g->power_w;
    double period = g->high_s + g->low_s;
    double phase = fmod(t, period);
    if (phase < 0) phase += period;
    return phase < g->high_s ? g->high_w : g->low_w;
}

/* Joules from the square wave's origin (t = 0, the Unix epoch) to t. */
static double square_cumulative(const struct gpu_cfg *g, double t) {
    double period = g->high_s + g->low_s;
    double periods = floor(t / period);
    double rest = t - periods * period;
    double high = rest < g->high_s ? rest : g->high_s;
    double low = rest > g->high_s ? rest - g->high_s : 0.0;
    return periods * (g->high_w * g->high_s + g->low_w * g->low_s) + high * g->high_w + low * g->low_w;
}

static unsigned long long energy_mj_at(const struct gpu_cfg *g, double t) {
    if (t <= g->energy_origin) return 0;
    double joules;
    if (g->profile == PROFILE_CONSTANT) joules = g->power_w * (t - g->energy_origin);
    else joules = square_cumulative(g, t) - square_cumulative(g, g->energy_origin);
    return (unsigned long long)llround(joules * 1000.0);
}

/* ---- call prologues ---------------------------------------------------------------------------- */

/* Load the control file and check the library is initialised and the driver present. */
static nvmlReturn_t enter(struct cfg **out) {
    struct cfg *c = malloc(sizeof(struct cfg));
    if (c == NULL) return NVML_ERROR_MEMORY;
    if (load_cfg(c) != 0) {
        free(c);
        return NVML_ERROR_UNKNOWN;
    }
    pthread_mutex_lock(&state_lock);
    int initialised = refcount > 0;
    pthread_mutex_unlock(&state_lock);
    if (!initialised) {
        free(c);
        return NVML_ERROR_UNINITIALIZED;
    }
    if (c->gone) {
        int err = c->gone_error;
        free(c);
        return err;
    }
    *out = c;
    return NVML_SUCCESS;
}

/* Like enter(), then resolve the handle and apply the GPU's faults for `function`. */
static nvmlReturn_t enter_device(const char *function, nvmlDevice_t device, struct cfg **out,
                                 const struct gpu_cfg **gpu) {
    struct cfg *c;
    nvmlReturn_t rc = enter(&c);
    if (rc != NVML_SUCCESS) return rc;
    if (device == NULL || device < &devices[0] || device >= &devices[MAX_GPUS]) {
        free(c);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    int index = device->index;
    if (index >= c->gpus) {  /* the GPU vanished from the control file: it fell off the bus */
        free(c);
        return NVML_ERROR_GPU_IS_LOST;
    }
    const struct gpu_cfg *g = &c->gpu[index];
    if (g->hang_ms > 0) {
        struct timespec ts = {g->hang_ms / 1000, (g->hang_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    }
    rc = g->error;
    for (int i = 0; rc == NVML_SUCCESS && i < g->n_fn_errors; i++) {
        if (strcmp(g->fn_errors[i].function, function) == 0) rc = g->fn_errors[i].code;
    }
    if (rc != NVML_SUCCESS) {
        free(c);
        return rc;
    }
    *out = c;
    *gpu = g;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_out(char *buf, unsigned int length, const char *value) {
    if (buf == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, value);
    return NVML_SUCCESS;
}

/* ---- exported NVML functions ------------------------------------------------------------------- */

#define EXPORT __attribute__((visibility("default")))

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    for (size_t i = 0; i < sizeof(ERRORS) / sizeof(ERRORS[0]); i++) {
        if (ERRORS[i].code == result) return ERRORS[i].text;
    }
    return "Unknown Error";
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    struct cfg *c = malloc(sizeof(struct cfg));
    if (c == NULL) return NVML_ERROR_MEMORY;
    if (load_cfg(c) != 0) {
        free(c);
        return NVML_ERROR_UNKNOWN;
    }
    nvmlReturn_t rc = NVML_SUCCESS;
    pthread_mutex_lock(&state_lock);
    int attempt = init_attempts++;
    if (c->gone) rc = NVML_ERROR_DRIVER_NOT_LOADED;
    else if (c->init_error != NVML_SUCCESS) rc = c->init_error;
    else if (attempt < c->init_failures) rc = NVML_ERROR_DRIVER_NOT_LOADED;
    else refcount++;
    pthread_mutex_unlock(&state_lock);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void) {
    struct cfg *c = malloc(sizeof(struct cfg));
    if (c == NULL) return NVML_ERROR_MEMORY;
    int loaded = load_cfg(c) == 0;
    nvmlReturn_t rc = NVML_SUCCESS;
    pthread_mutex_lock(&state_lock);
    if (refcount == 0) {
        rc = NVML_ERROR_UNINITIALIZED;
    } else if (loaded && c->gone) {
        refcount = 0;  /* the driver took all state with it */
        rc = c->gone_error;
    } else {
        refcount--;
    }
    pthread_mutex_unlock(&state_lock);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    struct cfg *c;
    nvmlReturn_t rc = enter(&c);
    if (rc != NVML_SUCCESS) return rc;
    rc = copy_out(version, length, c->driver_version);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    struct cfg *c;
    nvmlReturn_t rc = enter(&c);
    if (rc != NVML_SUCCESS) return rc;
    if (count == NULL) rc = NVML_ERROR_INVALID_ARGUMENT;
    else *count = (unsigned int)c->gpus;
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    struct cfg *c;
    nvmlReturn_t rc = enter(&c);
    if (rc != NVML_SUCCESS) return rc;
    if (device == NULL || index >= (unsigned int)c->gpus) {
        free(c);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    free(c);
    devices[index].index = (int)index;
    const struct gpu_cfg *g;
    rc = enter_device("nvmlDeviceGetHandleByIndex_v2", &devices[index], &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    *device = &devices[index];
    free(c);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetUUID", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    rc = copy_out(uuid, length, g->uuid);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetName", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    rc = copy_out(name, length, g->name);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetPciInfo_v3", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (pci == NULL) {
        free(c);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    memset(pci, 0, sizeof(*pci));
    unsigned int domain = 0, bus = 0, dev = 0, fn = 0;
    sscanf(g->pci_bus_id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn);
    pci->domain = domain;
    pci->bus = bus;
    pci->device = dev;
    pci->pciDeviceId = 0x233010DEu;
    pci->pciSubSystemId = 0x16C110DEu;
    snprintf(pci->busId, sizeof(pci->busId), "%s", g->pci_bus_id);
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%04X:%02X:%02X.%X", domain & 0xFFFF, bus, dev, fn);
    free(c);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMigMode", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (current == NULL || pending == NULL) rc = NVML_ERROR_INVALID_ARGUMENT;
    else if (g->mig < 0) rc = NVML_ERROR_NOT_SUPPORTED;
    else *current = *pending = (unsigned int)g->mig;
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power_mw) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetPowerUsage", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (power_mw == NULL) rc = NVML_ERROR_INVALID_ARGUMENT;
    else *power_mw = (unsigned int)lround(power_at(g, now_s(c)) * 1000.0);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy_mj) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetTotalEnergyConsumption", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (energy_mj == NULL) rc = NVML_ERROR_INVALID_ARGUMENT;
    else if (!g->energy_supported) rc = NVML_ERROR_NOT_SUPPORTED;
    else *energy_mj = energy_mj_at(g, now_s(c));
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit_mw) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetEnforcedPowerLimit", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (limit_mw == NULL) rc = NVML_ERROR_INVALID_ARGUMENT;
    else if (g->power_limit_w < 0) rc = NVML_ERROR_NOT_SUPPORTED;
    else *limit_mw = (unsigned int)lround(g->power_limit_w * 1000.0);
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMemoryInfo", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (memory == NULL) {
        rc = NVML_ERROR_INVALID_ARGUMENT;
    } else {  /* v1 counts driver-reserved memory as used */
        memory->total = g->memory_total;
        memory->used = g->memory_used + g->memory_reserved;
        memory->free = g->memory_total - memory->used;
    }
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMemoryInfo_v2", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (memory == NULL) {
        rc = NVML_ERROR_INVALID_ARGUMENT;
    } else if (!g->memory_v2 || memory->version != NVML_MEMORY_V2_VERSION) {
        rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    } else {
        memory->total = g->memory_total;
        memory->reserved = g->memory_reserved;
        memory->used = g->memory_used;
        memory->free = g->memory_total - g->memory_used - g->memory_reserved;
    }
    free(c);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    struct cfg *c;
    const struct gpu_cfg *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetUtilizationRates", device, &c, &g);
    if (rc != NVML_SUCCESS) return rc;
    if (utilization == NULL) rc = NVML_ERROR_INVALID_ARGUMENT;
    else if (g->util_pct < 0) rc = NVML_ERROR_NOT_SUPPORTED;
    else {
        utilization->gpu = (unsigned int)g->util_pct;
        utilization->memory = (unsigned int)(g->util_pct * 2 / 5);
    }
    free(c);
    return rc;
}
