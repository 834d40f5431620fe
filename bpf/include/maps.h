/* Every map of the datapath: what it holds and who writes it. The loader pins each one
 * under the bpffs directory (default /sys/fs/bpf/meshaccel) by the name used here. */
#ifndef MESHACCEL_MAPS_H
#define MESHACCEL_MAPS_H

#include "types.h"
#include "config.h"

/* [0] -> struct ma_config. Written by the loader at attach; read by sockops. */
BPF_ARRAY(config_map, struct ma_config, 1);

/* pod address -> struct pod_config (a pod with two addresses has two equal entries).
 * Written by `meshaccel pod add/remove`; read by connect4/6. Pods not here are not
 * captured at all. */
BPF_HASH(pod_config, struct ip_key, struct pod_config, MA_MAX_PODS);

/* netns cookie of a meshed pod -> one of its addresses (a key of pod_config). Written by
 * `meshaccel pod add/remove`; read by connect4/6 to find the pod of a socket. */
BPF_HASH(pod_by_netns, __u64, struct ip_key, MA_MAX_PODS);

/* (netns cookie, prefix) of a registered pod -> 1: the prefixes its netns accepts by a
 * local route that no address of it covers (AnyIP). Written by `meshaccel pod add/remove`;
 * read by connect4/6 and sk_lookup, to which a call to such a prefix is local to the pod
 * (istio-iptables' `-o lo`). Absent in releases before. */
BPF_LPM_TRIE(pod_local_routes, struct local_route_key, __u8, MA_MAX_PODS);

/* netns cookie of a registered pod -> struct shortcut_policy, for pods that set one.
 * Written by `meshaccel pod add/remove`; read by sockops. No entry: the node's setting. */
BPF_HASH(pod_shortcut, __u64, struct shortcut_policy, MA_MAX_PODS);

/* [0] -> struct lookup_tag: per CPU, the netns of the sk_lookup under way. Written by
 * each pod's tag program (linked into its netns ahead of sk_lookup, by `meshaccel pod
 * add`); read and cleared by sk_lookup, which so finds the pod of a connection for an
 * address pod add did not register (added later, AnyIP). Absent in releases before. */
BPF_PERCPU_ARRAY(sk_lookup_netns, struct lookup_tag, 1);

/* [0] -> struct attach_info. Written and read by the loader only (status, detach). */
BPF_ARRAY(attach_info_map, struct attach_info, 1);

/* enum counter -> per-CPU count. Written by every program; read by `meshaccel status`. */
BPF_PERCPU_ARRAY(counters, __u64, CNT__MAX);

/* socket cookie of the app's socket -> original destination. Written by connect4/6,
 * moved into orig_dst_by_sock by sockops once the connection is established (the source
 * port is not known at connect time). LRU: a connect() that never completes ages out. */
BPF_TABLE("lru_hash", __u64, struct orig_dst, orig_dst_by_cookie, MA_MAX_CONNS);

/* app socket's sock_key -> original destination. Written by sockops; read by getsockopt
 * on the sidecar's accepted socket (which looks up its peer's key); deleted by sockops
 * when the sidecar's end closes. */
BPF_TABLE("lru_hash", struct sock_key, struct orig_dst, orig_dst_by_sock, MA_MAX_CONNS);

/* sock_key -> established socket that takes part in a captured app<->sidecar connection.
 * Written by sockops; the kernel removes a socket when it closes. redirect (sk_msg) is
 * attached to this map and sends each message to the peer found here. */
BPF_SOCKHASH(sock_hash, struct sock_key, MA_MAX_CONNS);

/* sock_key of one end of a sidecar-to-sidecar connection that the callee pod's REDIRECT
 * moved to its inbound port -> sock_key of the other end (each end sees another 4-tuple,
 * so peer_key() cannot compute it). Written by sockops for both ends when the callee's
 * end is established, each deleted when its own socket closes; read by redirect. */
BPF_TABLE("lru_hash", struct sock_key, struct sock_key, nat_peer, MA_MAX_CONNS);

/* Socket-local storage: present on a socket whose sendmsg() once found no peer and took
 * the TCP path (the value is unused). Written by redirect, which then sends every later
 * message of that socket the TCP way too: bytes that went over TCP may still sit unread
 * in the peer's receive queue, and the kernel reads the redirect (psock) queue first, so
 * a redirected later message could overtake them. Lives and dies with the socket, never
 * evicted (fell_back below is an LRU map, which may evict the entry of a live socket).
 * Userspace never reads it. Absent in releases before. */
BPF_SK_STORAGE(fell_back_sk, __u8);

/* sock_key of a socket whose sendmsg() once found no peer and took the TCP path -> 1.
 * Written by redirect; deleted by sockops on close. The record `status` and tests read
 * (fell_back_sk cannot be listed); redirect trusts it only for a socket that has no
 * fell_back_sk mark (its allocation failed). LRU: may lose entries of live sockets. */
BPF_TABLE("lru_hash", struct sock_key, __u8, fell_back, MA_MAX_CONNS);

/* pod address -> the pod's sidecar inbound listener (istio-iptables -z, 15006). Written
 * by sockops when a registered pod's socket listens on that port; the kernel removes it
 * when it closes. Read by sk_lookup. No program is attached to it. Spelled out because
 * bcc's BPF_SOCKHASH has no .lookup and BPF_TABLE no .sock_hash_update; bcc turns each
 * member into its helper call. */
struct inbound_listener_table_t {
	struct ip_key key;
	__u64 leaf;
	void *(*lookup)(struct ip_key *);
	int (*sock_hash_update)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct inbound_listener_table_t inbound_listener = {.max_entries = MA_MAX_PODS};
BPF_ANNOTATE_KV_PAIR(inbound_listener, struct ip_key, __u64);

#endif /* MESHACCEL_MAPS_H */
