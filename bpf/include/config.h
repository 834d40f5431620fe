/* Compile-time sizes. loader.attach(cflags=["-DMA_MAX_CONNS=4096"]) overrides them (the
 * tests build small maps to reach capacity); the version record's source hash covers
 * them, so attach replaces a datapath built with other sizes. Runtime settings live in
 * maps (config_map, pod_config), so changing them needs no recompile. */
#ifndef MESHACCEL_CONFIG_H
#define MESHACCEL_CONFIG_H

#ifndef MA_MAX_CONNS
#define MA_MAX_CONNS 65536 /* in-flight captured connections and sockhash entries */
#endif /* MA_MAX_CONNS */

#ifndef MA_MAX_PODS
#define MA_MAX_PODS 1024 /* pod addresses per node */
#endif /* MA_MAX_PODS */

#ifndef MA_PAGE_SIZE
#define MA_PAGE_SIZE 4096 /* cgroup sockopt programs see at most one page of optval */
#endif /* MA_PAGE_SIZE */

#endif /* MESHACCEL_CONFIG_H */
