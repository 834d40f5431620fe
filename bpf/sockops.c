/* sockops: when a captured app<->sidecar connection is established, file the original
 * destination under the app socket's 4-tuple (for getsockopt) and put both sockets in
 * sock_hash (for redirect), unless the shortcut is switched off. Only sockets of captured connections go in: they are the
 * only ones that will receive redirected data. */
#include "helpers.h"

/* May this socket join sock_hash, by its pod's own setting? Only loopback tuples (they
 * carry the pod's netns cookie) have an app at one end; sidecar<->sidecar ones do not. */
static __always_inline int pod_allows(const struct sock_key *key, __u16 app_port)
{
	__u64 cookie = key->netns_cookie;
	struct shortcut_policy *p;

	if (!cookie)
		return 1;
	p = pod_shortcut.lookup(&cookie);
	if (!p)
		return 1;
	if (p->off)
		return 0;
#pragma unroll
	for (int i = 0; i < MA_MAX_SHORTCUT_EXCLUDE; i++)
		if (i < p->n_ports && p->ports[i] == app_port)
			return 0;
	return 1;
}

/* Both ends of a captured connection: ask for BPF_SOCK_OPS_STATE_CB, so the
 * per-connection entries go when it closes, and join sock_hash unless the shortcut is off
 * (for the node, or for this pod or app port). */
static __always_inline void track(struct bpf_sock_ops *skops, struct sock_key *key,
				  __u16 app_port)
{
	struct ma_config *cfg = config();

	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	if (!cfg || !cfg->shortcut)
		return;
	if (!pod_allows(key, app_port)) {
		count(CNT_SOCK_KEPT_OFF_BY_POD, 1);
		return;
	}
	/* (bcc rewrites map methods only as whole statements, hence the local) */
	long err = sock_hash.sock_hash_update(skops, key, BPF_ANY);

	if (err) {
		count(CNT_SOCK_INSERT_FAILED, 1);
		return;
	}
	count(CNT_SOCK_INSERTED, 1);
}

/* The app's side: connect() completed; was it one connect4/6 captured? */
static __always_inline void active_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *found = orig_dst_by_cookie.lookup(&cookie);
	struct orig_dst od;
	struct sock_key key = {};

	if (!found)
		return;
	od = *found;
	orig_dst_by_cookie.delete(&cookie);
	SOCK_KEY_FROM_CTX(&key, skops);
	long err = orig_dst_by_sock.update(&key, &od);

	if (err) {
		count(CNT_CONNECT_RECORD_FAILED, 1);
		return;
	}
	track(skops, &key, od.port);
}

/* The sidecar's side: accepted a connection; is its peer a captured app socket? */
static __always_inline void passive_established(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};
	struct sock_key peer = {};
	struct orig_dst *od;

	SOCK_KEY_FROM_CTX(&key, skops);
	peer_key(&key, &peer);
	od = orig_dst_by_sock.lookup(&peer);
	if (!od)
		return;
	track(skops, &key, od->port);
}

static __always_inline void closed(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};
	struct sock_key peer = {};

	SOCK_KEY_FROM_CTX(&key, skops);
	fell_back.delete(&key);
	/* The original destination goes when the sidecar's end closes, not the app's: an
	 * app may connect, send and close before the sidecar even accepted (conntrack keeps
	 * its entry that long too). On the app's end this deletes nothing. */
	peer_key(&key, &peer);
	orig_dst_by_sock.delete(&peer);
}

/* A socket of a registered pod starts listening: if on the pod's inbound port, it is the
 * sidecar's inbound listener, which sk_lookup hands captured inbound connections to. */
static __always_inline void listening(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_netns_cookie(skops);
	struct ip_key *pod_ip = pod_by_netns.lookup(&cookie);
	struct pod_config *pod = pod_ip ? pod_config.lookup(pod_ip) : 0;
	struct ip_key key;

	if (!pod || skops->local_port != pod->inbound_port)
		return;
	/* an AF_INET6 listener may also take IPv4 (unless v6only): the pod's IPv4 address
	 * gets it only when no AF_INET listener claims that address */
	if (skops->family == MA_AF_INET6) {
		key = pod->ips[1];
		if (key.ip[0] | key.ip[1] | key.ip[2] | key.ip[3])
			inbound_listener.sock_hash_update(skops, &key, BPF_ANY);
	}
	key = pod->ips[0];
	if (key.ip[2]) /* the pod has an IPv4 address (v4-mapped: ::ffff:a.b.c.d) */
		inbound_listener.sock_hash_update(skops, &key,
						  skops->family == MA_AF_INET ? BPF_ANY : BPF_NOEXIST);
}

int ma_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		passive_established(skops);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		listening(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			closed(skops);
		break;
	}
	return 1;
}
