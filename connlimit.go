package main

// connlimit.go bounds the HTTP listener by the file descriptors the process
// may open. Each connection costs one; so does each database connection, each
// broker connection and the runtime's own. A client that opens connections
// faster than they are answered would otherwise take the last descriptor, and
// the next database connection, or the next accept, fails with "too many open
// files". At the cap the listener stops accepting: new connections wait in
// the kernel's backlog, which costs the process nothing, until one closes.

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// fdReserve is what the process keeps for everything but HTTP connections:
// the database pool (16 by default) and the LISTEN connection, the broker
// clients, the runtime's epoll and timers, standard streams, a pprof
// listener.
const fdReserve = 64

// fdLimits derives the caps from RLIMIT_NOFILE: HTTP connections may take
// all but fdReserve descriptors, event streams at most half of those, so that
// the API keeps the other half whatever a container's limit is (often 1024).
// streams is min(maxStreams, that half).
func fdLimits(maxStreams int) (conns, streams int) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur > 1<<30 {
		return 1 << 30, maxStreams
	}
	conns = max(int(lim.Cur)-fdReserve, 2)
	return conns, min(maxStreams, conns/2)
}

// limitListener accepts at most max connections open at once.
type limitListener struct {
	net.Listener
	slots chan struct{}
	open  atomic.Int64
}

func newLimitListener(ln net.Listener, max int) *limitListener {
	return &limitListener{Listener: ln, slots: make(chan struct{}, max)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	l.slots <- struct{}{} // a free slot first: at the cap, the kernel holds the next one
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	l.open.Add(1)
	return &limitedConn{Conn: c, l: l}, nil
}

func (l *limitListener) max() int { return cap(l.slots) }

// gauges are the connections open and the cap, for /metrics.
func (l *limitListener) gauges() (open, most int) { return int(l.open.Load()), l.max() }

type limitedConn struct {
	net.Conn
	l    *limitListener
	once sync.Once
}

// CloseWrite lets the HTTP server half-close a connection it answers with an
// error (431, say) so that the client reads the answer rather than a reset.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.open.Add(-1)
		<-c.l.slots
	})
	return err
}
