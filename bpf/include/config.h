/* Compile-time defaults; the loader passes -D overrides. Runtime settings (proxy port,
 * proxy uid) live in config_map, so changing them needs no recompile. */
#ifndef MESHACCEL_CONFIG_H
#define MESHACCEL_CONFIG_H

#ifndef MA_MAX_CONNS
#define MA_MAX_CONNS 65536 /* in-flight captured connections and sockhash entries */
#endif /* MA_MAX_CONNS */

#ifndef MA_PAGE_SIZE
#define MA_PAGE_SIZE 4096 /* cgroup sockopt programs see at most one page of optval */
#endif /* MA_PAGE_SIZE */

#endif /* MESHACCEL_CONFIG_H */
