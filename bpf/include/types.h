/* Structs and enums shared by the eBPF programs and Python (meshaccel/datapath/structs.py mirrors
 * them; tests/kernel/test_layout.py checks the mirror against what bcc compiled).
 * Keep this the only place these layouts are written down in C.
 *
 * Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), so one
 * key type serves AF_INET sockets, AF_INET6 sockets and v4-mapped AF_INET6 sockets.
 * Ports are host byte order everywhere in these structs.
 */
#ifndef MESHACCEL_TYPES_H
#define MESHACCEL_TYPES_H

/* One end of a TCP connection as seen by a socket: its local and remote address, plus
 * the netns cookie, because every pod has its own 127.0.0.1 and 4-tuples repeat. */
struct sock_key {
	__u64 netns_cookie;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
	__u32 _pad;
};

/* Where the app wanted to go before connect() was rewritten to the sidecar. */
struct orig_dst {
	__u32 ip[4];
	__u16 port;
	__u16 family; /* AF_INET or AF_INET6: what SO_ORIGINAL_DST answers with */
	__u32 flags;  /* OD_* */
};

enum orig_dst_flags {
	OD_REWRITTEN = 1 << 0, /* connect4/6 sent it to the sidecar: only we know where it went */
	OD_ASKED = 1 << 1,     /* the sidecar has read SO_ORIGINAL_DST (detach waits for it) */
};

/* Which captured connections' sockets go in sock_hash (the sk_msg shortcut). An app's
 * own socket there sees the kernel's sockmap semantics (SO_RCVLOWAT, splice, MSG_WAITALL,
 * FIONREAD, blocking reads after half-close differ: `meshaccel selftest`), so by default
 * only sidecar-to-sidecar connections (two Envoys, whose way of reading is known) take it;
 * a pod opts its app in with its own setting (struct shortcut_policy). */
enum shortcut_mode {
	MA_SHORTCUT_OFF = 0,
	MA_SHORTCUT_ALL = 1,      /* app<->sidecar sockets too (what releases before wrote for "on") */
	MA_SHORTCUT_SIDECARS = 2, /* sidecar<->sidecar sockets; apps only where their pod opts in */
};

/* Node-wide datapath settings written by the loader into config_map[0]. */
struct ma_config {
	__u32 shortcut; /* enum shortcut_mode */
};

/* A pod's address, or a map key by address: IPv4 v4-mapped, like everywhere here. */
struct ip_key {
	__u32 ip[4];
};

/* A prefix a pod's netns accepts through a local route rather than an interface address
 * (`ip route add local 10.77.0.0/24 dev lo`: AnyIP), as an LPM trie key: the netns
 * cookie, then the address (v4-mapped). The cookie is two words so that no padding sits
 * between prefixlen and the data the trie matches bit by bit. */
struct local_route_key {
	__u32 prefixlen; /* 64 (the whole cookie) + the prefix's length over 128 bits */
	__u32 netns_cookie[2];
	__u32 ip[4];
};

/* One istio-iptables rule of a pod (ISTIO_OUTPUT or ISTIO_INBOUND), compiled by
 * meshaccel/datapath/pods.py from the same Rule objects the iptables mode renders. Rules are
 * walked in order; the first that matches decides (no match: not captured). */
struct capture_rule {
	__u32 match;   /* RM_* bits: every condition named must hold */
	__u32 action;  /* RA_* */
	__u32 addr[4]; /* RM_SRC / RM_DST: address and mask (v4-mapped, mask over 128 bits) */
	__u32 mask[4];
	__u32 owner;   /* RM_UID / RM_GID */
	__u16 port;    /* RM_DPORT */
	__u8 family;   /* 4 or 6: the iptables or ip6tables table the rule belongs to */
	__u8 _pad;
};

enum rule_match {
	RM_OUT_LO = 1 << 0,    /* -o lo: the destination is local to the pod */
	RM_SRC = 1 << 1,       /* -s addr/mask */
	RM_DST = 1 << 2,       /* -d addr/mask */
	RM_NOT_DST = 1 << 3,   /* with RM_DST: ! -d */
	RM_UDP = 1 << 4,       /* -p udp: never matches a TCP connect() */
	RM_DPORT = 1 << 5,     /* --dport */
	RM_NOT_DPORT = 1 << 6, /* with RM_DPORT: ! --dport */
	RM_UID = 1 << 7,       /* -m owner --uid-owner */
	RM_GID = 1 << 8,       /* -m owner --gid-owner */
	RM_NOT_OWNER = 1 << 9, /* with RM_UID/RM_GID: ! --uid-owner / ! --gid-owner */
};

enum rule_action {
	RA_RETURN = 1,      /* leave the connection alone */
	RA_REDIRECT = 2,    /* to the sidecar's outbound port (ISTIO_REDIRECT) */
	RA_IN_REDIRECT = 3, /* to the sidecar's inbound port (ISTIO_IN_REDIRECT) */
};

#define MA_MAX_RULES 48

/* A meshed pod: written by `meshaccel pod add` under each of its addresses. */
struct pod_config {
	__u64 netns_cookie;
	struct ip_key ips[2];  /* IPv4 (v4-mapped) and IPv6; zero when the pod has none */
	__u16 proxy_port;      /* istio-iptables -p */
	__u16 inbound_port;    /* istio-iptables -z */
	__u16 n_output;        /* rules used in output[] */
	__u16 n_inbound;       /* rules used in inbound[] */
	struct capture_rule output[MA_MAX_RULES];
	struct capture_rule inbound[MA_MAX_RULES];
	char name[64];         /* namespace/name, for people */
	char args[512];        /* its istio-iptables args, for people */
};

/* What a pod's tag program (meshaccel/datapath/lookup_tag.py, linked into its netns
 * before sk_lookup) writes for the lookup under way: the netns it runs in, which
 * ma_sk_lookup cannot learn itself (no bpf_get_netns_cookie for sk_lookup), with the
 * lookup's own fields, so that a value written for another lookup is never taken for
 * this one's. Only compared with the ctx, never interpreted. */
struct lookup_tag {
	__u64 netns_cookie;  /* 0: no tag */
	__u32 remote_ip[4];  /* v4-mapped for AF_INET */
	__u32 family;        /* AF_INET or AF_INET6, as ctx->family */
	__u32 local_port;
	__u16 remote_port;
	__u16 _pad[3];
};

#define MA_MAX_SHORTCUT_EXCLUDE 16

/* What a pod's own app<->sidecar sockets do on the shortcut (its meshaccel.io/shortcut
 * annotation). 1 is what releases before wrote for "off". */
enum pod_apps {
	MA_POD_APPS_NODE = 0, /* as the node's shortcut_mode says */
	MA_POD_APPS_OFF = 1,  /* none of the pod's app<->sidecar sockets joins sock_hash */
	MA_POD_APPS_ON = 2,   /* they join (but for ports[]), also in MA_SHORTCUT_SIDECARS */
	MA_POD_APPS_NONE = 3, /* no socket of the pod joins: its sidecar<->sidecar ones neither */
};

/* A pod's own shortcut setting (its meshaccel.io/shortcut* annotations), for apps known
 * to read as a sidecar does, or that need plain TCP semantics on some ports (see README,
 * known limitations). Written by `meshaccel pod add` under the pod's netns cookie when
 * the pod has one. */
struct shortcut_policy {
	__u32 apps;    /* enum pod_apps */
	__u16 n_ports; /* ports[] used */
	__u16 ports[MA_MAX_SHORTCUT_EXCLUDE]; /* ports kept off it on every hop: the
					       * destination port of the pod's outbound
					       * connections, its app's own inbound port */
	__u16 _pad;
};

/* Which cgroup the programs are attached to (so that status and detach need not be told),
 * and the capture settings pods get by default.
 * Written by the loader into attach_info_map[0]; no program reads it. */
struct attach_info {
	__u64 cgroup_id;       /* inode number of the cgroup directory; nothing reads it (the
				* path says where), but dropping it would change this map's
				* value size, which every upgrade would then have to migrate */
	char cgroup_path[248]; /* NUL-terminated */
	char default_args[512]; /* istio-iptables args for pods added without their own */
};

/* Index into the per-CPU counters array. Python reads them under these names in
 * lower case (enum name minus the CNT_ prefix); keep CNT__MAX last. */
enum counter {
	CNT_CONNECT_CAPTURED = 0,        /* connect() rewritten to the sidecar's outbound port */
	CNT_CONNECT_CAPTURED_INBOUND,    /* the sidecar calling its own pod: to its inbound port */
	CNT_CONNECT_SIDECAR_TO_POD,      /* sidecar to a captured port of a pod on this node */
	CNT_CONNECT_PASSTHROUGH,         /* sidecar's inbound passthrough (127.0.0.6) to its app */
	CNT_CONNECT_SKIPPED_NO_POD,      /* socket not in a meshed pod's netns */
	CNT_CONNECT_SKIPPED_PROXY_UID,   /* connect() by the sidecar itself (owner rule) */
	CNT_CONNECT_SKIPPED_LOCAL,       /* destination local to the pod (loopback, own IP) */
	CNT_CONNECT_SKIPPED_RULE,        /* excluded, or not included, by the pod's rules */
	CNT_CONNECT_SKIPPED_NOT_TCP,     /* UDP and other non-stream sockets */
	CNT_INBOUND_CAPTURED,            /* connection for a pod handed to its inbound listener */
	CNT_INBOUND_NO_LISTENER,         /* captured port, but no sidecar listening: to the app */
	CNT_INBOUND_ASSIGN_FAILED,       /* bpf_sk_assign() refused (e.g. v4 to a v6-only socket) */
	CNT_CONNECT_RECORD_FAILED,       /* could not remember the original destination: not captured */
	CNT_ORIG_DST_ANSWERED,           /* SO_ORIGINAL_DST answered from the map */
	CNT_ORIG_DST_NOT_FOUND,          /* SO_ORIGINAL_DST asked for a connection we did not capture */
	CNT_SOCK_INSERTED,               /* sockets added to the sockhash */
	CNT_SOCK_INSERT_FAILED,          /* sockhash update refused (full, or socket state) */
	CNT_MSG_REDIRECTED,              /* sendmsg() handed straight to the peer socket */
	CNT_MSG_REDIRECTED_BYTES,
	CNT_MSG_FALLBACK_NO_PEER,        /* peer socket not in the sockhash: normal TCP path */
	CNT_MSG_FALLBACK_BYTES,
	CNT_ORIG_DST_BY_CONNTRACK,       /* SO_ORIGINAL_DST left as conntrack answered (the pod has nat rules) */
	CNT_SOCK_KEPT_OFF_BY_POD,        /* sockets kept off the shortcut by their pod's setting */
	CNT_SOCK_KEPT_OFF_APP,           /* app<->sidecar sockets kept off it by the node's default */
	CNT__MAX,
};

#endif /* MESHACCEL_TYPES_H */
