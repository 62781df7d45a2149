package main

// metrics_runtime.go writes the Go runtime and process metrics that Prometheus users
// expect of any Go service, under the names the Prometheus Go client gives
// them, read from runtime/metrics (no stop-the-world, unlike ReadMemStats)
// and /proc/self. Where /proc is missing (not Linux) the process_* series
// are left out rather than invented.

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// goSamples are the runtime/metrics this file reads, by their Prometheus name.
var goSamples = []struct{ name, typ, help, key string }{
	{"go_goroutines", "gauge", "Number of goroutines that currently exist.", "/sched/goroutines:goroutines"},
	{"go_sched_gomaxprocs_threads", "gauge", "GOMAXPROCS: threads that may run Go code at once.", "/sched/gomaxprocs:threads"},
	{"go_memstats_heap_alloc_bytes", "gauge", "Bytes of allocated heap objects.", "/memory/classes/heap/objects:bytes"},
	{"go_memstats_heap_objects", "gauge", "Number of allocated heap objects.", "/gc/heap/objects:objects"},
	{"go_memstats_next_gc_bytes", "gauge", "Heap size at which the next GC cycle starts.", "/gc/heap/goal:bytes"},
	{"go_memstats_sys_bytes", "gauge", "Bytes of memory obtained from the OS.", "/memory/classes/total:bytes"},
	{"go_memstats_alloc_bytes_total", "counter", "Bytes allocated on the heap, in total.", "/gc/heap/allocs:bytes"},
	{"go_gc_cycles_total", "counter", "Completed GC cycles.", "/gc/cycles/total:gc-cycles"},
}

// clockTicks is USER_HZ, the unit of /proc/self/stat's times: 100 on every
// Linux platform Go supports.
const clockTicks = 100

func writeRuntimeMetrics(w io.Writer) {
	samples := make([]rtmetrics.Sample, len(goSamples))
	for i, s := range goSamples {
		samples[i].Name = s.key
	}
	rtmetrics.Read(samples)
	for i, s := range goSamples {
		var v float64
		switch samples[i].Value.Kind() {
		case rtmetrics.KindUint64:
			v = float64(samples[i].Value.Uint64())
		case rtmetrics.KindFloat64:
			v = samples[i].Value.Float64()
		default:
			continue // not in this Go version
		}
		sample(w, s.name, s.typ, s.help, v)
	}
	threads, _ := runtime.ThreadCreateProfile(nil)
	sample(w, "go_threads", "gauge", "Number of OS threads created.", float64(threads))
	fmt.Fprintf(w, "# HELP go_info Information about the Go environment.\n# TYPE go_info gauge\ngo_info{version=%q} 1\n", runtime.Version())

	// GC pauses as the Go client has always written them: a summary with
	// the minimum, quartiles and maximum of recent pauses.
	var gc debug.GCStats
	gc.PauseQuantiles = make([]time.Duration, 5)
	debug.ReadGCStats(&gc)
	fmt.Fprintf(w, "# HELP go_gc_duration_seconds A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.\n"+
		"# TYPE go_gc_duration_seconds summary\n")
	for i, q := range []string{"0", "0.25", "0.5", "0.75", "1"} {
		fmt.Fprintf(w, "go_gc_duration_seconds{quantile=%q} %s\n", q, formatFloat(gc.PauseQuantiles[i].Seconds()))
	}
	fmt.Fprintf(w, "go_gc_duration_seconds_sum %s\ngo_gc_duration_seconds_count %d\n", formatFloat(gc.PauseTotal.Seconds()), gc.NumGC)

	writeProcessMetrics(w)
}

// writeProcessMetrics reads /proc/self: CPU time, memory, file descriptors
// and the start time.
func writeProcessMetrics(w io.Writer) {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return
	}
	// The command name, in parentheses, may hold spaces: fields are counted
	// after its closing one, so f[0] is field 3 (state) of proc(5).
	s := string(stat)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 22 {
		return
	}
	num := func(field int) float64 { // field as numbered in proc(5)
		v, _ := strconv.ParseFloat(f[field-3], 64)
		return v
	}
	sample(w, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", (num(14)+num(15))/clockTicks)
	sample(w, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", num(23))
	sample(w, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", num(24)*float64(os.Getpagesize()))
	if boot, ok := bootTime(); ok {
		sample(w, "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", boot+num(22)/clockTicks)
	}
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		sample(w, "process_open_fds", "gauge", "Number of open file descriptors.", float64(len(fds)))
	}
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		sample(w, "process_max_fds", "gauge", "Maximum number of open file descriptors.", float64(lim.Cur))
	}
}

// bootTime is btime of /proc/stat: the clock's value at boot, in seconds.
func bootTime() (float64, bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			t, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return t, err == nil
		}
	}
	return 0, false
}

func sample(w io.Writer, name, typ, help string, v float64) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %s\n", name, help, name, typ, name, formatFloat(v))
}

func formatFloat(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
