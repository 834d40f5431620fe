/* sk_lookup, attached to each registered pod's netns: a TCP connection arriving for the
 * pod (from another pod, another node or the node itself) on a port its ISTIO_INBOUND
 * rules capture is handed to the sidecar's inbound listener (15006), as istio-iptables'
 * PREROUTING REDIRECT would. Chosen over TC rewriting because nothing is NATed: the
 * accepted socket keeps podIP:port as its local address, so there is no reverse
 * translation to get wrong, and SO_ORIGINAL_DST is simply that address. */
#include "helpers.h"

#define MA_IPPROTO_TCP 6

int ma_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct ip_key dst = {};
	struct conn c = {};
	const struct capture_rule *r;
	struct pod_config *pod;
	struct bpf_sock *sk;

	if (ctx->protocol != MA_IPPROTO_TCP)
		return SK_PASS;
	if (CTX_LOAD32(ctx, family) == MA_AF_INET) {
		ip4_to_mapped(CTX_LOAD32(ctx, local_ip4), dst.ip);
		ip4_to_mapped(CTX_LOAD32(ctx, remote_ip4), c.src);
		c.family = 4;
	} else {
		dst.ip[0] = CTX_LOAD32(ctx, local_ip6[0]);
		dst.ip[1] = CTX_LOAD32(ctx, local_ip6[1]);
		dst.ip[2] = CTX_LOAD32(ctx, local_ip6[2]);
		dst.ip[3] = CTX_LOAD32(ctx, local_ip6[3]);
		c.src[0] = CTX_LOAD32(ctx, remote_ip6[0]);
		c.src[1] = CTX_LOAD32(ctx, remote_ip6[1]);
		c.src[2] = CTX_LOAD32(ctx, remote_ip6[2]);
		c.src[3] = CTX_LOAD32(ctx, remote_ip6[3]);
		c.family = 6;
	}
	pod = pod_config.lookup(&dst);
	if (!pod)
		return SK_PASS;
	/* The pod calling itself never meets PREROUTING: connect4/6 decided already. That
	 * includes Envoy's IPv6 inbound passthrough from ::6 (on lo, but not loopback). */
	if (is_loopback(c.src) || is_pod_address(pod->netns_cookie, c.src) ||
	    (!c.src[0] && !c.src[1] && !c.src[2] && c.src[3] == bpf_htonl(6)))
		return SK_PASS;
	__builtin_memcpy(c.dst, dst.ip, sizeof(c.dst));
	c.dport = CTX_LOAD32(ctx, local_port);
	c.uid = c.gid = 0xffffffff; /* PREROUTING has no owner */
	r = first_match(pod->inbound, pod->n_inbound, &c);
	if (!r || r->action != RA_IN_REDIRECT)
		return SK_PASS;

	sk = (struct bpf_sock *)inbound_listener.lookup(listener_key(pod, c.family));
	if (!sk) {
		/* no sidecar listening (restarting, not up yet): refused, as istio-iptables'
		 * REDIRECT to a port nobody listens on refuses it. Never to the app: that would
		 * skip the sidecar's policy. */
		count(CNT_INBOUND_NO_LISTENER, 1);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);

	bpf_sk_release(sk);
	count(err ? CNT_INBOUND_ASSIGN_FAILED : CNT_INBOUND_CAPTURED, 1);
	return SK_PASS;
}
