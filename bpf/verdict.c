/* sk_skb stream verdict on sock_hash: pass every skb, do nothing else.
 *
 * Its presence is what counts. Bytes reach a socket in sock_hash over TCP when their
 * sender fell back (its first message found no peer, see redirect.c). Stable kernels
 * 6.6.128+, 6.12.75+ and 6.18.14+ answer FIONREAD on a sockmap socket from its psock
 * queue alone, so with only an sk_msg program such bytes read as 0. With a verdict
 * program the kernel moves each skb that arrives off the TCP receive queue and, on
 * SK_PASS, onto the socket's own psock queue, where FIONREAD, poll and recvmsg look.
 * Not before accept(): bytes that came earlier wait on the TCP queue until the next
 * segment or a recv moves them (the kernel needs the socket's struct socket to read
 * them). Redirected bytes never pass here. Attached as BPF_SK_SKB_STREAM_VERDICT without
 * a parser (5.10+); BPF_SK_SKB_VERDICT (5.13+) measured the same on 6.18. */
#include "helpers.h"

int ma_verdict(struct __sk_buff *skb)
{
	return SK_PASS;
}
