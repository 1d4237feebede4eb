/* FlexNPU native front end: the aclnn API's types and the helpers the generated operator
 * functions (gen/fx_aclnn.c, from flexnpu/aclnn_api.py) are written with. */
#ifndef FX_ACLNN_H
#define FX_ACLNN_H
#include <stdbool.h>

#include "launch_enc.h"

typedef int aclnnStatus;
typedef struct aclTensor aclTensor;
typedef struct aclScalar aclScalar;
typedef struct aclIntArray aclIntArray;
typedef struct aclFloatArray aclFloatArray;
typedef struct aclBoolArray aclBoolArray;
typedef struct aclTensorList aclTensorList;
typedef struct aclScalarList aclScalarList;
typedef struct aclOpExecutor aclOpExecutor;
typedef int aclDataType;

/* aclnn status codes (aclnn/acl_meta.h) */
#define ACLNN_SUCCESS 0
#define ACLNN_ERR_PARAM_NULLPTR 161001
#define ACLNN_ERR_PARAM_INVALID 161002
#define ACLNN_ERR_RUNTIME_ERROR 361001
#define ACLNN_ERR_INNER 561000

void fx_arg_tensor(struct fx_enc *e, const aclTensor *t);
void fx_arg_scalar(struct fx_enc *e, const aclScalar *s);
void fx_arg_int_array(struct fx_enc *e, const aclIntArray *a);
void fx_arg_float_array(struct fx_enc *e, const aclFloatArray *a);
void fx_arg_bool_array(struct fx_enc *e, const aclBoolArray *a);
void fx_arg_tensor_list(struct fx_enc *e, const aclTensorList *l);
void fx_arg_scalar_list(struct fx_enc *e, const aclScalarList *l);

/* An executor encoding "op" with nargs positional arguments; the generated GetWorkspaceSize
 * function encodes each argument into fx_exec_enc(x), then calls fx_exec_ready. */
aclOpExecutor *fx_exec_new(const char *op, const char *what, unsigned nargs);
struct fx_enc *fx_exec_enc(aclOpExecutor *x);
aclnnStatus fx_exec_ready(aclOpExecutor *x, uint64_t *workspaceSize, aclOpExecutor **executor, const char *what);
aclnnStatus fx_exec_run(void *workspace, uint64_t workspaceSize, aclOpExecutor *x, aclrtStream stream,
                        const char *what);
#endif
