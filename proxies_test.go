package main

// proxies_test.go: the faults the tests put between the service and
// PostgreSQL: a TCP proxy that can refuse or hang every connection, and one
// that reads the protocol to lose, delay or replace the answer to a COMMIT.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// poolerPID is the process id commitProxy announces for every connection.
const poolerPID = 2_000_000_000

// commitProxy forwards to PostgreSQL as a pooler in session mode would, and
// acts on one order commit: the COMMIT bound, in an extended-protocol
// pipeline, on the connection that sent the marker it was armed with (an
// Idempotency-Key, among a statement's parameters). Other commits pass
// untouched, the relay's among them: it commits a claim every poll, on
// connections of the same pool. Armed with a delay, it holds back the
// server's answer for that long, as a slow network would; armed to cut, it
// forwards the whole pipeline and then drops the connection, and every
// cancel request after, as a network that fails just then would. As poolers
// do, it announces made-up process ids (poolerPID), so that the service must
// learn the real one from the server.
type commitProxy struct {
	*tcpProxy
	armed       atomic.Pointer[commitAct]
	cancelsLost atomic.Bool // since the cut
	// version, when set, is the server_version announced to clients in
	// place of the server's, as an older server would announce its own.
	version atomic.Pointer[string]
}

// commitAct is what commitProxy does to the COMMIT of the connection that
// sends marker.
type commitAct struct {
	marker []byte
	delay  time.Duration
	cut    bool
	fatal  fatalAt
}

// fatalAt is where the proxy ends a connection as a server process told to
// terminate (FATAL 57P01) does: not at all, just after COMMIT's answer, or in
// its place.
type fatalAt int

// arm makes the proxy act on the next COMMIT of the connection that sends
// marker: hold its answer back for delay, or cut the connection after it.
func (p *commitProxy) arm(marker string, delay time.Duration, cut bool) {
	p.armed.Store(&commitAct{marker: []byte(marker), delay: delay, cut: cut})
}

// armFatal makes the proxy end the connection that sends marker with FATAL
// 57P01 at the next COMMIT: after its answer, or instead of it (the server
// commits either way), and close the server's side.
func (p *commitProxy) armFatal(marker string, at fatalAt) {
	p.armed.Store(&commitAct{marker: []byte(marker), fatal: at})
}

// terminated is the ErrorResponse of a server process ended by
// pg_terminate_backend or a fast shutdown.
var terminated = func() []byte {
	body := []byte("SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to administrator command\x00\x00")
	msg := append([]byte{'E', 0, 0, 0, 0}, body...)
	binary.BigEndian.PutUint32(msg[1:], uint32(len(body)+4))
	return msg
}()

func newCommitProxy(t testing.TB, schema string) (*commitProxy, string) {
	p, url := newDBProxy(t, schema)
	cp := &commitProxy{tcpProxy: p}
	p.mu.Lock()
	p.pipeFn = cp.pipe
	p.mu.Unlock()
	return cp, url
}

// pipe reads the client's messages (after the untyped startup message, each
// is a type byte and a length), remembers which prepared statement is COMMIT
// from its Parse, and knows the commit by its Bind.
func (p *commitProxy) pipe(c net.Conn) {
	up, ok := p.connect(c)
	if !ok {
		return
	}
	var holdUntil atomic.Int64
	var fatal atomic.Int32 // a fatalAt, for this connection's next COMMIT answer
	go func() {
		defer up.Close()
		var n [4]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		startup := make([]byte, binary.BigEndian.Uint32(n[:])-4)
		if _, err := io.ReadFull(c, startup); err != nil {
			return
		}
		// A CancelRequest (code 80877102) comes on a connection of its own,
		// as pgx sends one when it drops a connection; after a cut, the
		// network that lost the pipeline's answer loses these too.
		if len(startup) == 12 && binary.BigEndian.Uint32(startup) == 80877102 && p.cancelsLost.Load() {
			c.Close()
			return
		}
		up.Write(append(n[:], startup...))
		commits := map[string]bool{} // prepared statement names whose SQL is COMMIT
		var marked *commitAct        // the act whose marker this connection sent
		cutAtSync := false
		for {
			var hdr [5]byte
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return
			}
			body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
			if _, err := io.ReadFull(c, body); err != nil {
				return
			}
			switch hdr[0] {
			case 'P': // Parse: statement name, query
				if f := bytes.SplitN(body, []byte{0}, 3); len(f) == 3 && strings.EqualFold(string(f[1]), "commit") {
					commits[string(f[0])] = true
				}
			case 'B': // Bind: portal name, statement name, parameters
				if a := p.armed.Load(); a != nil && bytes.Contains(body, a.marker) {
					marked = a
				}
				if f := bytes.SplitN(body, []byte{0}, 3); len(f) == 3 && commits[string(f[1])] &&
					marked != nil && p.armed.CompareAndSwap(marked, nil) {
					if marked.delay > 0 {
						holdUntil.Store(time.Now().Add(marked.delay).UnixNano())
					}
					cutAtSync = marked.cut
					fatal.Store(int32(marked.fatal))
				}
			}
			if _, err := up.Write(append(hdr[:], body...)); err != nil {
				return
			}
			if hdr[0] == 'S' && cutAtSync {
				p.cancelsLost.Store(true)
				c.Close()
				return
			}
		}
	}()
	// Like a pooler, the proxy tells the client a process id of its own
	// (no PostgreSQL process has it): the server's BackendKeyData ('K')
	// arrives before the first ReadyForQuery.
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(up, hdr[:]); err != nil {
			c.Close()
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
		if _, err := io.ReadFull(up, body); err != nil {
			c.Close()
			return
		}
		if hdr[0] == 'K' && len(body) >= 4 {
			binary.BigEndian.PutUint32(body, poolerPID)
		}
		if v := p.version.Load(); v != nil && hdr[0] == 'S' && bytes.HasPrefix(body, []byte("server_version\x00")) {
			body = append([]byte("server_version\x00"+*v), 0)
			binary.BigEndian.PutUint32(hdr[1:], uint32(len(body)+4))
		}
		if _, err := c.Write(append(hdr[:], body...)); err != nil {
			return
		}
		if hdr[0] == 'Z' {
			break
		}
	}
	r := &msgReader{r: up}
	for {
		typ, body, err := r.next()
		if err != nil {
			break
		}
		time.Sleep(time.Until(time.Unix(0, holdUntil.Load())))
		if at := fatalAt(fatal.Load()); typ == 'C' && string(body) == "COMMIT\x00" && at != noFatal {
			if at == fatalAfterCommit {
				c.Write(r.raw) //nolint:errcheck // the connection ends below either way
			}
			c.Write(terminated) //nolint:errcheck // as above
			up.Close()
			break
		}
		if _, err := c.Write(r.raw); err != nil {
			break
		}
	}
	c.Close()
}

// tcpProxy stands between the service and PostgreSQL. Cut, it drops every
// connection and then accepts new ones without ever answering: the worst
// case, where only timeouts can save the caller.
type tcpProxy struct {
	pipeFn func(net.Conn) // how a connection is forwarded; nil: pipe
	ln     net.Listener
	target func() (net.Conn, error)
	mu     sync.Mutex
	down   bool
	hung   bool
	conns  map[net.Conn]bool
}

func newDBProxy(t testing.TB, schema string) (*tcpProxy, string) {
	t.Helper()
	cc := testDB.Config().ConnConfig
	network, addr := "tcp", net.JoinHostPort(cc.Host, strconv.Itoa(int(cc.Port)))
	if strings.HasPrefix(cc.Host, "/") {
		network, addr = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", cc.Host, cc.Port)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{ln: ln, conns: map[net.Conn]bool{},
		target: func() (net.Conn, error) { return net.Dial(network, addr) }}
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.set(false)
	})
	u := url.URL{Scheme: "postgres", User: url.UserPassword(cc.User, cc.Password), Host: ln.Addr().String(), Path: "/" + cc.Database,
		RawQuery: url.Values{"sslmode": {"disable"}, "search_path": {schema}}.Encode()}
	if cc.Password == "" {
		u.User = url.User(cc.User)
	}
	return p, u.String()
}

func (p *tcpProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns[c] = true
		down, pipe := p.down, p.pipeFn
		p.mu.Unlock()
		if down {
			continue // held open, never answered
		}
		if pipe == nil {
			pipe = p.pipe
		}
		go pipe(c)
	}
}

// connect dials PostgreSQL for client c and tracks the connection, so that
// set can cut it; on failure it closes c.
func (p *tcpProxy) connect(c net.Conn) (net.Conn, bool) {
	up, err := p.target()
	if err != nil {
		c.Close()
		return nil, false
	}
	p.mu.Lock()
	p.conns[up] = true
	p.mu.Unlock()
	return up, true
}

func (p *tcpProxy) pipe(c net.Conn) {
	up, ok := p.connect(c)
	if !ok {
		return
	}
	go func() { p.copy(up, c); up.Close() }()
	p.copy(c, up)
	c.Close()
}

// copy forwards src to dst, holding what it reads while the proxy hangs.
func (p *tcpProxy) copy(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		for p.hanging() {
			time.Sleep(10 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *tcpProxy) hanging() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hung
}

// hang makes the database answer nothing, on the connections open (they stay
// open) and on new ones, until hang(false): a server stuck, not gone.
func (p *tcpProxy) hang(hung bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hung, p.down = hung, hung
}

// set cuts (down) or restores the database; both drop every connection.
func (p *tcpProxy) set(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

const (
	noFatal fatalAt = iota
	fatalAfterCommit
	fatalInsteadOfCommit
)
