package main

// docs_test.go holds the README and docs/ to the repository: every relative
// link and anchor resolves, every docs page can be reached from the README,
// every function the reading tour names exists, and every test a page names
// is one the suite runs.

import (
	"bufio"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// The teaching pages' budgets: what a newcomer reads before the code, and
// all that a learner reads. History pages (measurements, the breakage log,
// benchmark runs) are not teaching pages and have none.
const (
	maxREADME        = 15000
	maxTeachingPages = 60000
)

var historyPage = regexp.MustCompile(`(?i)history|breakage|bench|changelog`)

var (
	mdLink       = regexp.MustCompile(`\[([^\]]*)\]\(([^)\s]+)\)`)
	mdHeading    = regexp.MustCompile(`^#{1,6}\s+(.*?)\s*#*\s*$`)
	codeSpan     = regexp.MustCompile("`([^`]+)`")
	testFuncName = regexp.MustCompile(`^(Test|Fuzz|Benchmark)[A-Z]\w*$`)
	goFuncName   = regexp.MustCompile(`^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$`)
)

// mdPage is a Markdown file's links and anchors, code blocks left out.
type mdPage struct {
	links   [][2]string // text, target
	anchors map[string]bool
	lines   []string // outside code blocks
}

func readPage(t *testing.T, path string) mdPage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := mdPage{anchors: map[string]bool{}}
	seen := map[string]int{}
	inCode := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inCode = !inCode
			continue
		}
		if inCode {
			continue
		}
		p.lines = append(p.lines, line)
		if m := mdHeading.FindStringSubmatch(line); m != nil {
			a := slug(m[1])
			if n := seen[a]; n > 0 {
				p.anchors[a+"-"+strconv.Itoa(n)] = true
			} else {
				p.anchors[a] = true
			}
			seen[a]++
		}
		for _, m := range mdLink.FindAllStringSubmatch(line, -1) {
			p.links = append(p.links, [2]string{m[1], m[2]})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return p
}

// sectionLines is the lines of a page's "## heading" section, code blocks
// left out.
func sectionLines(t *testing.T, path, heading string) []string {
	t.Helper()
	var lines []string
	in := false
	for _, line := range readPage(t, path).lines {
		if strings.HasPrefix(line, "## ") {
			in = strings.TrimSpace(line) == "## "+heading
			continue
		}
		if in {
			lines = append(lines, line)
		}
	}
	return lines
}

// slug is GitHub's anchor for a heading: lower case, punctuation dropped
// (but - and _), spaces made hyphens.
func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

func markdownFiles(t *testing.T) []string {
	t.Helper()
	files := []string{"README.md"}
	err := filepath.WalkDir("docs", func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(path, ".md") {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// goDecls is every function and method declared in the package's files,
// functions by name and methods by receiver.name, split by test and non-test
// files.
func goDecls(t *testing.T) (code, tests map[string]string) {
	t.Helper()
	decl := regexp.MustCompile(`(?m)^func (?:\(\w+ \*?(\w+)(?:\[[^\]]*\])?\) )?(\w+)[\[(]`)
	code, tests = map[string]string{}, map[string]string{}
	files, _ := filepath.Glob("*.go")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		into := code
		if strings.HasSuffix(f, "_test.go") {
			into = tests
		}
		for _, m := range decl.FindAllStringSubmatch(string(b), -1) {
			if m[1] != "" {
				into[m[1]+"."+m[2]] = f
			} else {
				into[m[2]] = f
			}
		}
	}
	return code, tests
}

// Every relative link and anchor of the README and docs/ resolves, every page
// is reached from the README, every test a page names exists, and a link
// named for a function leads to the file that declares it.
func TestDocsLinksResolve(t *testing.T) {
	code, tests := goDecls(t)
	pages := map[string]mdPage{}
	files := markdownFiles(t)
	for _, f := range files {
		pages[f] = readPage(t, f)
	}
	reached := map[string]bool{"README.md": true}
	queue := []string{"README.md"}
	for len(queue) > 0 {
		from := queue[0]
		queue = queue[1:]
		for _, l := range pages[from].links {
			text, target := strings.Trim(l[0], "`"), l[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file, anchor, _ := strings.Cut(target, "#")
			path := from
			if file != "" {
				path = filepath.Clean(filepath.Join(filepath.Dir(from), file))
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Errorf("%s: link [%s](%s): %s does not exist", from, l[0], target, path)
				continue
			}
			if fi.IsDir() {
				continue
			}
			if strings.HasSuffix(path, ".md") {
				if _, ok := pages[path]; !ok {
					pages[path] = readPage(t, path)
				}
				if anchor != "" && !pages[path].anchors[anchor] {
					t.Errorf("%s: link [%s](%s): no heading #%s in %s", from, l[0], target, anchor, path)
				}
				if !reached[path] {
					reached[path] = true
					queue = append(queue, path)
				}
			}
			// A link named for a function must lead to the file that
			// declares it.
			if strings.HasSuffix(path, ".go") && goFuncName.MatchString(text) && !strings.HasSuffix(text, ".go") {
				decls := code
				if strings.HasSuffix(path, "_test.go") {
					decls = tests
				}
				if decls[text] != path {
					t.Errorf("%s: link [%s](%s): %s declares no func %s", from, l[0], target, path, text)
				}
			}
		}
	}
	linked := map[string]bool{}
	for _, l := range pages["README.md"].links {
		file, _, _ := strings.Cut(l[1], "#")
		linked[filepath.Clean(file)] = true
	}
	for _, f := range files {
		if filepath.Dir(f) == "docs" && !linked[f] {
			t.Errorf("README.md links no %s: every page of docs/ is one link away", f)
		}
		if !reached[f] {
			t.Errorf("%s cannot be reached by links from README.md", f)
		}
		// Every test a page names is one the suite has.
		for _, line := range pages[f].lines {
			for _, m := range codeSpan.FindAllStringSubmatch(line, -1) {
				if testFuncName.MatchString(m[1]) && tests[m[1]] == "" {
					t.Errorf("%s names %s, which no test file declares", f, m[1])
				}
			}
		}
	}
	// The reading tour names functions: each must exist.
	tour := false
	for _, line := range pages["README.md"].lines {
		if strings.HasPrefix(line, "## ") {
			tour = strings.Contains(line, "reading tour")
		}
		if !tour {
			continue
		}
		for _, m := range codeSpan.FindAllStringSubmatch(line, -1) {
			name := m[1]
			if goFuncName.MatchString(name) && !slices.Contains([]string{"BEGIN", "COMMIT"}, name) && code[name] == "" {
				t.Errorf("README.md's reading tour names %s, which no file declares", name)
			}
		}
	}
}

// slug makes the anchors GitHub makes of headings, so that the link check
// above checks what readers click.
func TestSlugIsGitHubs(t *testing.T) {
	for heading, want := range map[string]string{
		"The SKIP LOCKED relay":                              "the-skip-locked-relay",
		"The API against its spec: schemathesis and Redocly": "the-api-against-its-spec-schemathesis-and-redocly",
		"Docker and compose":                                 "docker-and-compose",
		"A reading tour: one order through the code":         "a-reading-tour-one-order-through-the-code",
		"`relay.run` and `GET /orders`":                      "relayrun-and-get-orders",
	} {
		if got := slug(heading); got != want {
			t.Errorf("slug(%q) = %q, want %q", heading, got, want)
		}
	}
}

// The reading tour names functions and the files that hold them: each
// function must be declared in the file its step names. A name followed by
// "in [file.go](…)" is that file's; any other, the file the step opens with
// ("[outbox.go](outbox.go): …"), or the one linked last before it.
func TestReadingTourNamesTheFileOfEachFunction(t *testing.T) {
	code, _ := goDecls(t)
	page := readPage(t, "README.md")
	var steps []string
	tour := false
	for _, line := range page.lines {
		if strings.HasPrefix(line, "## ") {
			tour = strings.Contains(line, "reading tour")
			continue
		}
		switch {
		case !tour:
		case tourStep.MatchString(line):
			steps = append(steps, line)
		case len(steps) > 0 && strings.HasPrefix(line, "   "):
			steps[len(steps)-1] += " " + strings.TrimSpace(line)
		}
	}
	if len(steps) < 5 {
		t.Fatalf("README.md's reading tour has %d steps, want its numbered list", len(steps))
	}
	named := 0
	for _, step := range steps {
		var files []string // what a name without "in [file]" belongs to
		spanSeen := false
		for _, m := range tourPart.FindAllStringSubmatch(step, -1) {
			name, in, link := m[1], m[2], m[3]
			switch {
			case link != "" && !spanSeen:
				files = append(files, link) // the step's heading files
			case link != "":
				files = []string{link}
			case goFuncName.MatchString(name) && !slices.Contains([]string{"BEGIN", "COMMIT"}, name):
				spanSeen = true
				named++
				want := files
				if in != "" {
					want = []string{in}
				}
				if !slices.Contains(want, code[name]) {
					t.Errorf("README.md's reading tour places %s in %v; it is declared in %q", name, want, code[name])
				}
			default:
				spanSeen = true
			}
		}
	}
	t.Logf("%d functions named in %d steps, each in its file", named, len(steps))
}

var (
	tourStep = regexp.MustCompile(`^\d+\. `)
	// A code span, with the file it is said to be "in"; or a link to a Go file.
	tourPart = regexp.MustCompile("`([^`]+)`(?: in \\[[^\\]]*\\]\\(([^)#]+\\.go)\\))?|\\[[^\\]]*\\]\\(([^)#]+\\.go)\\)")
)

// Every default the configuration tables state is the code's: for each row,
// the service configured with the stated default (the README's short rows
// pair `A`, `B` with `x`, `y`) is configured exactly as with nothing set.
// Defaults that are not one value ("libpq defaults", "<user cache dir>/…")
// are left to their words. And every variable the code reads has its row in
// docs/operations.md.
func TestConfigurationTablesStateTheCodesDefaults(t *testing.T) {
	read := map[string]bool{}
	defaults, err := loadConfig(func(k string) string { read[k] = true; return "" })
	if err != nil {
		t.Fatal(err)
	}
	full := map[string]bool{}
	for _, page := range []string{"docs/operations.md", "README.md"} {
		rows := 0
		for _, line := range readPage(t, page).lines {
			cells := strings.Split(line, "|")
			if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
				continue
			}
			var vars, values []string
			for _, m := range codeSpan.FindAllStringSubmatch(cells[1], -1) {
				vars = append(vars, m[1])
			}
			if !configVar.MatchString(vars[0]) {
				continue
			}
			for _, m := range codeSpan.FindAllStringSubmatch(cells[2], -1) {
				values = append(values, m[1])
			}
			rows++
			for i, v := range vars {
				if !read[v] {
					t.Errorf("%s documents %s, which the service does not read", page, v)
				}
				if page == "docs/operations.md" {
					full[v] = true
				}
				if len(values) != len(vars) || strings.Contains(values[i], "<") {
					continue // not stated as one value each
				}
				got, err := loadConfig(func(k string) string {
					if k == v {
						return values[i]
					}
					return ""
				})
				if err != nil {
					t.Errorf("%s: %s's default `%s`: %v", page, v, values[i], err)
				} else if !reflect.DeepEqual(got, defaults) {
					t.Errorf("%s states %s's default as `%s`, which is not the code's", page, v, values[i])
				}
			}
		}
		if rows < 10 {
			t.Fatalf("%s: %d configuration rows found, want its table", page, rows)
		}
	}
	for v := range read {
		if !full[v] {
			t.Errorf("docs/operations.md has no row for %s, which the service reads", v)
		}
	}
}

var configVar = regexp.MustCompile(`^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$`)

// Every test, fuzz target and benchmark opens with a comment saying what it
// proves or measures: the promise a reader looks for, and the one a failure
// breaks.
func TestEveryTestSaysItsPromise(t *testing.T) {
	files, _ := filepath.Glob("*_test.go")
	decl := regexp.MustCompile(`^func (Test|Fuzz|Benchmark)[A-Z]\w*\(`)
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(b), "\n")
		for i, line := range lines {
			if !decl.MatchString(line) || strings.HasPrefix(line, "func TestMain(") {
				continue
			}
			n++
			if i == 0 || !strings.HasPrefix(lines[i-1], "//") {
				name, _, _ := strings.Cut(strings.TrimPrefix(line, "func "), "(")
				t.Errorf("%s:%d: %s has no comment saying what it proves", f, i+1, name)
			}
		}
	}
	if n < 50 {
		t.Fatalf("%d tests found, want the suite's", n)
	}
}

// The README's Layout names every file of the program, so that a reader who
// opens one knows what it is for.
func TestLayoutNamesEveryFile(t *testing.T) {
	named := map[string]bool{}
	for _, line := range sectionLines(t, "README.md", "Layout") {
		if strings.HasPrefix(line, "|") {
			first := strings.Split(line, "|")[1]
			for _, m := range codeSpan.FindAllStringSubmatch(first, -1) {
				named[m[1]] = true
			}
		}
	}
	files, _ := filepath.Glob("*.go")
	sql, _ := filepath.Glob("*.sql")
	for _, f := range append(files, sql...) {
		if !strings.HasSuffix(f, "_test.go") && !named[f] {
			t.Errorf("README.md's Layout does not name %s", f)
		}
	}
}

// Wherever a page says a function is "in [file.go](…)" or gives its file in
// parentheses ("`a`, `b` and `c` in [store.go](store.go)", "`writeDBError`
// ([problem.go](problem.go))"), the file declares it.
func TestDocsPlaceEachFunctionInItsFile(t *testing.T) {
	code, _ := goDecls(t)
	checked := 0
	for _, page := range markdownFiles(t) {
		text := strings.Join(readPage(t, page).lines, "\n")
		for _, para := range strings.Split(text, "\n\n") {
			para = strings.Join(strings.Fields(para), " ")
			for _, m := range placedNames.FindAllStringSubmatch(para, -1) {
				for _, n := range codeSpan.FindAllStringSubmatch(m[1], -1) {
					file, ok := code[n[1]]
					if !ok {
						continue // not a function: a type, a constant, a setting
					}
					checked++
					if file != m[2] {
						t.Errorf("%s places %s in %s; it is declared in %s", page, n[1], m[2], file)
					}
				}
			}
		}
	}
	t.Logf("%d functions placed in their files", checked)
}

// placedNames is a run of code spans ("`a`", "`a`, `b` and `c`") followed by
// the file they are said to be in.
var placedNames = regexp.MustCompile("((?:`[A-Za-z_][\\w.]*`(?:'s)?(?:,? and |, | or )?)+) (?:in |\\()\\[[^\\]]*\\]\\((?:\\.\\./)?(\\w+\\.go)\\)")

// Tests are filed by promise: docs/testing.md's guarantee table has one
// section per test file, each test it names is declared in its section's
// file, and every test of the suite is named there.
func TestGuaranteesAreFiledByPromise(t *testing.T) {
	_, tests := goDecls(t)
	page := readPage(t, "docs/testing.md")
	file, table := "", false
	named := map[string]bool{}
	for _, line := range page.lines {
		switch {
		case strings.HasPrefix(line, "## "):
			table = strings.HasPrefix(line, "## Every guarantee")
			file = ""
		case table && strings.HasPrefix(line, "### "):
			file = ""
			if m := sectionFile.FindStringSubmatch(line); m != nil {
				file = m[1]
			} else {
				t.Errorf("docs/testing.md: section %q names no test file", line)
			}
		case table && strings.HasPrefix(line, "|") && file != "":
			cells := strings.Split(line, "|")
			for _, m := range codeSpan.FindAllStringSubmatch(cells[len(cells)-2], -1) {
				if !testFuncName.MatchString(m[1]) {
					continue
				}
				named[m[1]] = true
				if tests[m[1]] != file {
					t.Errorf("docs/testing.md files %s under %s; it is declared in %s", m[1], file, tests[m[1]])
				}
			}
		}
	}
	for name, f := range tests {
		if (strings.HasPrefix(name, "Test") || strings.HasPrefix(name, "Fuzz")) && name != "TestMain" && !named[name] {
			t.Errorf("%s (%s) has no row in docs/testing.md's guarantee table", name, f)
		}
	}
}

// sectionFile is the test file a section of the guarantee table is for.
var sectionFile = regexp.MustCompile(`^### .*\[(\w+_test\.go)\]\(\.\./\w+_test\.go\)\s*$`)

// The README keeps within its budget, and the teaching pages (the README and
// docs/*.md but the history pages) within theirs: what is true now, not how
// it came to be.
func TestTeachingPagesKeepTheirBudget(t *testing.T) {
	pages, _ := filepath.Glob("docs/*.md")
	total := 0
	for _, p := range append([]string{"README.md"}, pages...) {
		if historyPage.MatchString(p) {
			continue
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if p == "README.md" && fi.Size() > maxREADME {
			t.Errorf("README.md is %d bytes, over its budget of %d: the rest belongs in docs/", fi.Size(), maxREADME)
		}
		total += int(fi.Size())
	}
	if total > maxTeachingPages {
		t.Errorf("the teaching pages hold %d bytes, over their budget of %d: measurements and stories belong in docs/history.md or docs/bench/", total, maxTeachingPages)
	}
	t.Logf("teaching pages: %d bytes of %d", total, maxTeachingPages)
}

// Every alert of monitoring/alerts.yml has its entry in docs/operations.md's
// Troubleshooting, and every entry there named for an alert is one.
func TestEveryAlertHasItsTroubleshootingEntry(t *testing.T) {
	b, err := os.ReadFile("monitoring/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	alerts := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s*- alert: (\w+)`).FindAllStringSubmatch(string(b), -1) {
		alerts[m[1]] = true
	}
	if len(alerts) < 5 {
		t.Fatalf("%d alerts found in monitoring/alerts.yml, want its rules", len(alerts))
	}
	entries := map[string]bool{}
	for _, line := range sectionLines(t, "docs/operations.md", "Troubleshooting") {
		if !strings.HasPrefix(line, "- ") {
			continue
		}
		for _, m := range regexp.MustCompile("\\*\\*`(OrderService\\w+)`\\*\\*").FindAllStringSubmatch(line, -1) {
			entries[m[1]] = true
		}
	}
	for a := range alerts {
		if !entries[a] {
			t.Errorf("docs/operations.md's Troubleshooting has no entry for the alert %s", a)
		}
	}
	for e := range entries {
		if !alerts[e] {
			t.Errorf("docs/operations.md's Troubleshooting has an entry for %s, which monitoring/alerts.yml does not define", e)
		}
	}
}
